"""Shapes shared by every resource: lists and deletions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

# Names that appear in URLs (adapters, tenants): no slashes, spaces or leading punctuation.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


T = TypeVar("T")


class ListResponse(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def page(
        cls, data: list[T], has_more: bool, cursor: Callable[[Any], str] = lambda x: x.id
    ) -> ListResponse[T]:
        """A page whose ``first_id``/``last_id`` are the cursors of its first and last items."""
        return cls(
            data=data,
            has_more=has_more,
            first_id=cursor(data[0]) if data else None,
            last_id=cursor(data[-1]) if data else None,
        )


class DeletedResponse(BaseModel):
    id: str
    object: str
    deleted: bool = True
