"""Shapes shared by every resource: lists and deletions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

# Names that appear in URLs (adapters, tenants): no slashes, spaces or leading punctuation.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"

# Creation times are Unix seconds throughout, as in OpenAI's objects.
CREATED_AT = "When it was created, in Unix seconds (UTC)."


T = TypeVar("T")


class ListResponse(BaseModel, Generic[T]):
    """One page of a list, newest first unless the route says otherwise.

    To read the next page, pass `last_id` as `after`, while `has_more` is true.
    """

    object: Literal["list"] = Field("list", description="Always `list`.")
    data: list[T] = Field(description="The items of this page.")
    has_more: bool = Field(description="Whether more items follow this page.")
    first_id: str | None = Field(
        None, description="Cursor of the first item of the page; null when the page is empty."
    )
    last_id: str | None = Field(
        None,
        description="Cursor of the last item of the page: pass it as `after` for the next "
        "page. Null when the page is empty.",
    )

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
    """What a successful deletion answers."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"id": "file-6f1c0e9a2b4d8c3e5a7f9b1d", "object": "dataset", "deleted": True}
            ]
        }
    )

    id: str = Field(description="Id of the deleted object.")
    object: str = Field(description="Type of the deleted object, e.g. `dataset` or `api_key`.")
    deleted: bool = Field(True, description="Always true: a failed deletion answers an error.")


class ErrorObject(BaseModel):
    """What went wrong: for people in `message`, for programs in `code`."""

    message: str = Field(description="What went wrong and, where it helps, what to do.")
    type: str = Field(
        description="The class of error, as OpenAI names them: `invalid_request_error`, "
        "`authentication_error`, `permission_error`, `not_found_error`, `conflict_error`, "
        "`rate_limit_error`, `service_unavailable_error` or `server_error`."
    )
    param: str | None = Field(
        description="The request field at fault, as a dotted path (e.g. `method.lora.r`); "
        "null when no one field is."
    )
    code: str | None = Field(
        description="Machine-readable reason, e.g. `missing_field` or `adapter_not_found`."
    )


class ErrorResponse(BaseModel):
    """The body of every error answer (4xx and 5xx)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "message": "method.lora.r: Input should be greater than or equal to 1",
                        "type": "invalid_request_error",
                        "param": "method.lora.r",
                        "code": "greater_than_equal",
                    }
                }
            ]
        }
    )

    error: ErrorObject = Field(description="The error.")
