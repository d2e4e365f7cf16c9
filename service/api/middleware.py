"""Request body size limit, enforced before and while the body streams in."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import INVALID_REQUEST, error_body


def limit_message(limit_bytes: int) -> str:
    return f"Request body is larger than the {limit_bytes / (1024 * 1024):g} MB limit."


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` once the streamed body passes the limit.

    An ``HTTPException`` on purpose: FastAPI re-raises those from body parsing (anything else
    becomes a generic 400), so it reaches the error handlers and renders as a standard 413.
    """

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(status_code=413, detail=limit_message(limit_bytes))


class BodySizeLimitMiddleware:
    """Refuse bodies over ``max_body_bytes``.

    A declared ``Content-Length`` over the limit is answered at once, without reading.
    Chunked or lying bodies are counted as they arrive, so nothing past the limit is ever
    buffered: the app's next ``receive()`` raises :class:`BodyTooLargeError`.
    """

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, reported_limit_bytes: int | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # The limit users configured (max_upload_mb), which messages quote; the enforced
        # limit may be a little higher to allow for multipart framing.
        self.reported_limit_bytes = reported_limit_bytes or max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            response = JSONResponse(
                error_body(
                    limit_message(self.reported_limit_bytes),
                    INVALID_REQUEST,
                    None,
                    "request_too_large",
                ),
                status_code=413,
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return

        limit, reported = self.max_body_bytes, self.reported_limit_bytes
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


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
