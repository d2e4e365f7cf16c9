"""One error shape for every failure: ``{"error": {"message", "type", "param", "code"}}``.

Routes raise :class:`ApiError` (or one of the helpers below); the handlers installed by
:func:`install_error_handlers` turn it, FastAPI's request validation errors, Starlette's HTTP
errors (unknown URL, wrong method, body too large) and any unexpected exception into that
shape. Unexpected exceptions are logged with their traceback and answered with a generic 500
that reveals nothing about the internals.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# Error ``type`` values; ``code`` is the finer, machine-readable reason.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
NOT_FOUND = "not_found_error"
CONFLICT = "conflict_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"
UNAVAILABLE = "service_unavailable_error"


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ApiError(Exception):
    """An error a route means to return; rendered in the standard shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers) if headers else None

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# --- helpers for the common cases ------------------------------------------------------------


def not_found(kind: str, id: str, param: str | None = None) -> ApiError:
    # Also used for other tenants' objects: their existence is never confirmed (no 403).
    return ApiError(404, f"No {kind} found with id '{id}'.", NOT_FOUND, param, f"{kind}_not_found")


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(422, message, INVALID_REQUEST, param, code)


# Errors that a retry cannot fix (a taken name, a full quota) say so: the OpenAI SDKs honour
# ``x-should-retry`` and would otherwise retry 409 and 429 twice, with back-off, by default.
_DO_NOT_RETRY = {"x-should-retry": "false"}


def conflict(message: str, param: str | None = None, code: str = "conflict") -> ApiError:
    return ApiError(409, message, CONFLICT, param, code, _DO_NOT_RETRY)


def too_large(limit_bytes: int, param: str | None = None) -> ApiError:
    mb = limit_bytes / (1024 * 1024)
    return ApiError(
        413,
        f"Request body is larger than the {mb:g} MB limit.",
        INVALID_REQUEST,
        param,
        "request_too_large",
    )


def quota_exceeded(message: str, code: str) -> ApiError:
    return ApiError(429, message, RATE_LIMIT, None, code, _DO_NOT_RETRY)


def unavailable(
    message: str, code: str = "unavailable", retry_after: int | None = None
) -> ApiError:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return ApiError(503, message, UNAVAILABLE, None, code, headers)


# --- request validation ----------------------------------------------------------------------

_LOCATIONS = {"body", "query", "path", "header", "cookie"}


def loc_to_param(loc: Sequence[str | int]) -> str | None:
    """``("body", "method", "n_epochs")`` → ``"method.n_epochs"``: the dotted field path."""
    parts = list(loc)
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    return ".".join(str(p) for p in parts) or None


def _validation_message(err: Mapping[str, Any], param: str | None) -> str:
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "invalid JSON")
        return f"Request body is not valid JSON: {detail}."
    msg = str(err.get("msg", "Invalid value"))
    return f"{param}: {msg}" if param else msg


def validation_error_to_api_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """Report the first problem precisely, and say how many more there are."""
    if not errors:
        return invalid("Invalid request.")
    first = errors[0]
    loc = first.get("loc", ())
    # A JSON decode error's loc is (body, character offset): an offset is no field name.
    param = None if first.get("type") == "json_invalid" else loc_to_param(loc)
    message = _validation_message(first, param)
    if len(errors) > 1:
        more = len(errors) - 1
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return invalid(message, param, str(first.get("type") or "invalid_value"))


# --- handlers --------------------------------------------------------------------------------


async def _api_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _validation_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error_to_api_error(exc.errors()).response()


_HTTP_CODES = {
    404: ("unknown_url", NOT_FOUND),
    405: ("method_not_allowed", INVALID_REQUEST),
    413: ("request_too_large", INVALID_REQUEST),
}


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code, type_ = _HTTP_CODES.get(status, (None, INVALID_REQUEST if status < 500 else SERVER))
    if status == 404 and exc.detail in (None, "Not Found"):
        message = f"Invalid URL ({request.method} {request.url.path})."
    else:
        message = str(exc.detail)
    headers = getattr(exc, "headers", None)
    return JSONResponse(error_body(message, type_, None, code), status_code=status, headers=headers)


async def _unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        error_body(
            "The server had an error while processing your request.",
            SERVER,
            None,
            "internal_error",
        ),
        status_code=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    # Exception → Starlette's ServerErrorMiddleware: the outermost catch-all.
    app.add_exception_handler(Exception, _unhandled_error_handler)
