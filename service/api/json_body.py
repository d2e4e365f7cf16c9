"""Inference request bodies parsed off the event loop, and refused before they cost much.

FastAPI reads a declared JSON body with ``json.loads`` on the event loop and validates it
there: every tenant's requests wait while one large body is parsed, and a huge unknown field
(``{"inputs": ["a"], "x": [{}, {}, ...]}``) is built whole before ``extra="forbid"`` refuses
it. :class:`OffLoopJSONRoute` parses the body first, in a worker thread, with
:class:`service.jsonstream.ObjectReader`: an unknown field is refused before its value is
read, a list field's items are validated one at a time and counted against the field's
``max_length``, so a bad body stops at its first bad item. FastAPI then validates the parsed
object as it would have (cheap: it is bounded and already checked), and documents the route
as it would have: the body is declared as usual.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

from annotated_types import MaxLen
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from service.api.errors import media_type
from service.api.schemas.inference import MAX_JSON_BYTES_PER_CHAR, MAX_TEXT_CHARS
from service.errors import ErrorKind, ServiceError
from service.jsonstream import JsonSyntaxError, ObjectReader, ValueTooLongError

# The JSON text of any one field or list item: the largest valid one, a pair of three texts
# at MAX_TEXT_CHARS every character of which is escaped at its longest, with room for keys.
MAX_VALUE_CHARS = MAX_JSON_BYTES_PER_CHAR * 3 * MAX_TEXT_CHARS + 4096
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class _ListField:
    items: TypeAdapter[Any]
    max_items: int


class ModelBodyReader:
    """Reads a JSON body for ``model`` (whose ``extra`` must be ``"forbid"``) as a dict of its
    fields, raising the errors FastAPI would (``RequestValidationError``, locations under
    ``body``) as soon as they are found."""

    def __init__(self, model: type[BaseModel], max_value_chars: int = MAX_VALUE_CHARS) -> None:
        if model.model_config.get("extra") != "forbid":
            raise TypeError(f"{model.__name__} must forbid extra fields")
        self._fields = set(model.model_fields)
        self._lists = {
            name: field
            for name, info in model.model_fields.items()
            if (field := _list_field(info.annotation, info.metadata)) is not None
        }
        self._max_value_chars = max_value_chars

    def read(self, body: bytes) -> dict[str, Any]:
        # In chunks: the reader then parses no more of a value than its bound allows.
        view = memoryview(body)
        reader = ObjectReader(view[i : i + _CHUNK] for i in range(0, len(body), _CHUNK))
        parsed: dict[str, Any] = {}
        key = ""
        try:
            for key in reader.members():
                if key not in self._fields:
                    raise _error("extra_forbidden", (key[:64],), "Extra inputs are not permitted")
                field = self._lists.get(key)
                if field is not None and reader.is_array():
                    parsed[key] = self._items(reader, key, field)
                else:
                    parsed[key] = reader.value(self._max_value_chars)
        except JsonSyntaxError as exc:
            raise RequestValidationError(
                [
                    {
                        "type": "json_invalid",
                        "loc": ("body",),
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": str(exc)},
                    }
                ]
            ) from None
        except ValueTooLongError as exc:
            raise ServiceError(
                f"{key}: a value is longer than {exc.max_chars} characters of JSON.",
                code="value_too_large",
                param=key,
                kind=ErrorKind.TOO_LARGE,
            ) from None
        return parsed

    def _items(self, reader: ObjectReader, key: str, field: _ListField) -> list[Any]:
        items: list[Any] = []
        for index, item in enumerate(reader.items(self._max_value_chars)):
            if index == field.max_items:
                raise _error(
                    "too_long",
                    (key,),
                    f"List should have at most {field.max_items} items after validation, not more",
                )
            try:
                field.items.validate_python(item)
            except ValidationError as exc:
                # The body as read so far: the error handler names the field by it (an
                # error's location may hold a union member's tag, which names none).
                raise RequestValidationError(
                    [{**e, "loc": ("body", key, index, *e["loc"])} for e in exc.errors()],
                    body={key: [*items, item]},
                ) from None
            items.append(item)
        return items


def _list_field(annotation: Any, metadata: list[Any]) -> _ListField | None:
    """A ``list[X]`` (or ``list[X] | None``) field with a ``max_length``: read item by item."""
    members = [annotation]
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
    if len(members) != 1 or get_origin(members[0]) is not list:
        return None
    max_items = next((m.max_length for m in metadata if isinstance(m, MaxLen)), None)
    if max_items is None:
        raise TypeError("a list field read item by item needs a max_length")
    (item,) = get_args(members[0])
    return _ListField(TypeAdapter(item), max_items)


def _error(type_: str, loc: tuple[str, ...], msg: str) -> RequestValidationError:
    return RequestValidationError([{"type": type_, "loc": ("body", *loc), "msg": msg}])


class _ParsedRequest(Request):
    """``request`` with its body already read and parsed: FastAPI reads both from here."""

    def __init__(self, request: Request, body: bytes, parsed: dict[str, Any] | None) -> None:
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if delivered:  # later reads (a disconnect check) go to the connection
                return await request.receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        super().__init__(request.scope, receive)
        self._parsed = parsed

    async def json(self) -> Any:
        return self._parsed


class OffLoopJSONRoute(APIRoute):
    """A route whose JSON body model is read by :class:`ModelBodyReader` in a worker thread.

    A body it refuses reaches FastAPI as missing, so that the caller's key and the query are
    checked first as for any body; FastAPI's error on the missing body is replaced by the
    reader's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            raise TypeError(f"{self.path} declares no body")
        reader = ModelBodyReader(self.body_field.field_info.annotation)

        async def parse_then_handle(request: Request) -> Response:
            refused: RequestValidationError | None = None
            content_type = media_type(request)
            if content_type == "application/json" or content_type.endswith("+json"):
                body = await request.body()
                if body:  # an empty body is FastAPI's to refuse, as usual
                    parsed: dict[str, Any] | None
                    try:
                        parsed = await run_in_threadpool(reader.read, body)
                    except RequestValidationError as exc:
                        # Answered where FastAPI answers a bad body: after the key is checked
                        # (401 first), in place of its error on a missing body.
                        refused, parsed = exc, None
                    request = _ParsedRequest(request, body, parsed)
            try:
                return await handler(request)
            except RequestValidationError:
                if refused is not None:
                    raise refused from None
                raise

        return parse_then_handle
