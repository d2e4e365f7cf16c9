"""Shapes shared by every resource: lists and deletions."""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

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


class DeletedResponse(BaseModel):
    id: str
    object: str
    deleted: bool = True
