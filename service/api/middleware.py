"""Request body size limits, one per route, enforced before and while the body streams in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import INVALID_REQUEST, error_body

_MB = 1024 * 1024


def limit_message(limit_bytes: int) -> str:
    size = f"{limit_bytes // _MB} MB" if limit_bytes % _MB == 0 else f"{limit_bytes:,}-byte"
    return f"Request body is larger than the {size} limit."


@dataclass(frozen=True)
class BodyLimit:
    """The most one route's request body may hold."""

    max_bytes: int
    # Allowed on top of max_bytes for a multipart form's framing (boundaries, part headers,
    # small fields), so that a file of max_bytes fits; the file itself is capped by the route.
    multipart_overhead: int = 0

    def enforced(self, scope: Scope) -> int:
        multipart = _content_type(scope).startswith(b"multipart/form-data")
        return self.max_bytes + (self.multipart_overhead if multipart else 0)


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` once the streamed body passes the limit.

    An ``HTTPException`` on purpose: FastAPI re-raises those from body parsing (anything else
    becomes a generic 400), so it reaches the error handlers and renders as a standard 413.
    """

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(status_code=413, detail=limit_message(limit_bytes))


class BodySizeLimitMiddleware:
    """Refuse bodies over their route's limit: ``routes`` by path, ``default`` for the rest.

    A declared ``Content-Length`` over the limit is answered at once, without reading.
    Chunked or lying bodies are counted as they arrive, so nothing past the limit is ever
    buffered: the app's next ``receive()`` raises :class:`BodyTooLargeError`.
    """

    def __init__(self, app: ASGIApp, routes: Mapping[str, BodyLimit], default: BodyLimit) -> None:
        self.app = app
        self.routes = routes
        self.default = default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        route = self.routes.get(_route_path(scope), self.default)
        # Messages quote the route's limit, not the multipart framing allowed on top of it.
        limit, reported = route.enforced(scope), route.max_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            response = JSONResponse(
                error_body(
                    limit_message(reported),
                    INVALID_REQUEST,
                    None,
                    "request_too_large",
                ),
                status_code=413,
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(reported)
            return message

        await self.app(scope, limited_receive, send)


def _route_path(scope: Scope) -> str:
    """The path the app routes on: behind a proxy's prefix (root_path), without it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _content_type(scope: Scope) -> bytes:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return bytes(value).lower()
    return b""


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
