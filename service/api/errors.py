"""One error shape for every failure: ``{"error": {"message", "type", "param", "code"}}``.

Routes and domain code raise :class:`service.errors.ServiceError`; :data:`RENDERING` maps its
kind to a status, an error ``type`` and headers. The handlers installed by
:func:`install_error_handlers` turn it, FastAPI's request validation errors, Starlette's HTTP
errors (unknown URL, wrong method, body too large), a busy or unreachable database (503,
Retry-After), a value the database refused (422) and any unexpected exception into that
shape. Unexpected exceptions are logged with their traceback and answered with a generic 500
that reveals nothing about the internals.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.db.outage import database_busy, database_unreachable
from service.errors import ErrorKind, ServiceError, invalid, unavailable, unsupported_media_type

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


# Errors that a retry cannot fix (a taken name, a full quota) say so: the OpenAI SDKs honour
# ``x-should-retry`` and would otherwise retry 409 and 429 twice, with back-off, by default.
_DO_NOT_RETRY = {"x-should-retry": "false"}


@dataclass(frozen=True)
class _Rendering:
    status: int
    type: str
    headers: Mapping[str, str] = field(default_factory=dict)


# The one place a kind of failure becomes HTTP.
RENDERING: Mapping[ErrorKind, _Rendering] = {
    ErrorKind.INVALID: _Rendering(422, INVALID_REQUEST),
    ErrorKind.UNSUPPORTED: _Rendering(400, INVALID_REQUEST),
    ErrorKind.NOT_FOUND: _Rendering(404, NOT_FOUND),
    ErrorKind.CONFLICT: _Rendering(409, CONFLICT, _DO_NOT_RETRY),
    ErrorKind.QUOTA: _Rendering(429, RATE_LIMIT, _DO_NOT_RETRY),
    ErrorKind.UNAVAILABLE: _Rendering(503, UNAVAILABLE),
    ErrorKind.UNAUTHENTICATED: _Rendering(401, AUTHENTICATION, {"WWW-Authenticate": "Bearer"}),
    ErrorKind.FORBIDDEN: _Rendering(403, PERMISSION),
    ErrorKind.TOO_LARGE: _Rendering(413, INVALID_REQUEST),
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: _Rendering(415, INVALID_REQUEST),
    ErrorKind.INTERNAL: _Rendering(500, SERVER),
}


def error_response(exc: ServiceError) -> JSONResponse:
    """``exc`` in the standard shape, with its kind's status and headers."""
    rendering = RENDERING[exc.kind]
    headers = dict(rendering.headers)
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return JSONResponse(
        error_body(exc.message, rendering.type, exc.param, exc.code),
        status_code=rendering.status,
        headers=headers or None,
    )


# --- request validation ----------------------------------------------------------------------

_LOCATIONS = {"body", "query", "path", "header", "cookie"}


def loc_to_param(loc: Sequence[str | int]) -> str | None:
    """``("body", "method", "n_epochs")`` → ``"method.n_epochs"``: the dotted field path."""
    parts = list(loc)
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    return ".".join(str(p) for p in parts) or None


def sent_steps(loc: Sequence[str | int], sent: Any, error_type: str) -> list[str | int] | None:
    """``loc``, an error's location in ``sent`` (a parsed JSON body), without the steps that
    name no part of ``sent``; None where ``loc`` does not follow ``sent``.

    In a union, pydantic adds the member it tried to the location: a discriminator's tag
    (``inputs.1.object.text``, ``inputs.1.text`` for a plain string), else the member's type
    (``str``, ``function-after[...]``, a model's name). The client sent no such field. Below a
    string, a number or a list (whose parts are indexes) a named step is such a tag; in an
    object, only one standing before a key the object holds (or the required field it left
    out). Other steps an object lacks come from a validator that reshaped the body before
    validation and did not map its errors back: there the location is left as pydantic gives
    it (None)."""
    kept: list[str | int] = []
    value = sent
    last = len(loc) - 1
    for i, step in enumerate(loc):
        if isinstance(value, dict):
            if step in value:
                value = value[step]
            elif not (i == last and error_type == "missing"):
                follows = i < last and (
                    loc[i + 1] in value or (i + 1 == last and error_type == "missing")
                )
                if not follows:
                    return None
                continue  # a member's tag, between the object and its field
        elif isinstance(value, list) and isinstance(step, int) and 0 <= step < len(value):
            value = value[step]
        else:
            continue  # a member's tag
        kept.append(step)
    return kept


def _error_param(err: Mapping[str, Any], body: Any) -> str | None:
    # A JSON decode error's loc is (body, character offset): an offset is no field name.
    if err.get("type") == "json_invalid":
        return None
    loc = list(err.get("loc", ()))
    # Only a JSON body is walked: a form's fields are flat, and hold no union.
    if loc[:1] == ["body"] and isinstance(body, dict | list):
        steps = sent_steps(loc[1:], body, str(err.get("type")))
        if steps is not None:
            loc = ["body", *steps]
    return loc_to_param(loc)


def _validation_message(err: Mapping[str, Any], param: str | None) -> str:
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "invalid JSON")
        return f"Request body is not valid JSON: {detail}."
    msg = str(err.get("msg", "Invalid value"))
    return f"{param}: {msg}" if param else msg


def _from_validation_errors(errors: Sequence[Mapping[str, Any]], body: Any) -> ServiceError:
    """Report the first problem precisely, naming the field of ``body`` (the request's body
    as sent) it is in, and say how many more there are."""
    if not errors:
        return invalid("Invalid request.")
    first = errors[0]
    param = _error_param(first, body)
    message = _validation_message(first, param)
    if len(errors) > 1:
        more = len(errors) - 1
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return invalid(message, param, str(first.get("type") or "invalid_value"))


# --- handlers --------------------------------------------------------------------------------


async def _service_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc)


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower-cased."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    content_type = media_type(request)
    if (
        errors
        and tuple(errors[0].get("loc", ())) == ("body",)
        and content_type  # none at all: FastAPI reads the body as JSON
        and not (content_type == "application/json" or content_type.endswith("+json"))
    ):
        # A JSON body sent as another type (curl's -d alone sends a form's) was a 422 "Input
        # should be a valid dictionary" naming nothing.
        return error_response(
            unsupported_media_type(
                f"Send the body as JSON (Content-Type: application/json), not {content_type[:64]}."
            )
        )
    return error_response(_from_validation_errors(errors, exc.body))


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


# nginx's "client closed request": no one reads it, but metrics and access logs show it.
CLIENT_CLOSED_REQUEST = 499


async def _client_disconnect_handler(request: Request, exc: Exception) -> Response:
    # The client went away while its body was being read (an upload cut off) or while its
    # inference waited (service.api.disconnect): its doing, not a server error, so no
    # traceback; handled here, it does not reach the catch-all below.
    assert isinstance(exc, ClientDisconnect)
    logger.info("client disconnected during %s %s", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def _transient_database_error(exc: Exception) -> ServiceError | None:
    """The 503 for a database that is busy or out of reach for now, else None (a fault)."""
    if database_busy(exc):
        return unavailable("The database is busy; retry shortly.", "database_busy", retry_after=1)
    if database_unreachable(exc):
        # Longer than a lock wait: PostgreSQL restarting or failing over takes seconds.
        return unavailable(
            "The database is unreachable; retry shortly.", "database_unavailable", retry_after=5
        )
    return None


async def _database_error_handler(request: Request, exc: Exception) -> JSONResponse:
    error = _transient_database_error(exc)
    if error is None:
        return await _unhandled_error_handler(request, exc)
    # The request's transaction was rolled back (or ended with its connection): nothing of it
    # is stored, and it may be sent again as it was. One line, no traceback: an outage would
    # otherwise log one per request.
    logger.warning(
        "%s on %s %s: %s",
        error.code,
        request.method,
        request.url.path,
        str(exc).splitlines()[0],
    )
    return error_response(error)


async def _data_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # A value the database refused (PostgreSQL: a NUL in text, text longer than its column, a
    # number out of range): the request's, since every stored value comes from one. The edge
    # checks should have refused it with the field's name, so the warning marks a check to add;
    # the transaction was rolled back, nothing of the request is stored.
    logger.warning(
        "database refused a value on %s %s: %s",
        request.method,
        request.url.path,
        str(exc).splitlines()[0],
    )
    return error_response(
        invalid(
            "The request holds a value the database cannot store (a control character, or "
            "text too long for its field).",
            None,
            "unstorable_value",
        )
    )


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
    app.add_exception_handler(ServiceError, _service_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(ClientDisconnect, _client_disconnect_handler)
    app.add_exception_handler(PoolTimeoutError, _database_error_handler)
    # Every DBAPIError: SQLAlchemy marks a connection lost mid-statement on whichever error
    # class the driver raised. What is neither busy nor unreachable still gets the 500.
    app.add_exception_handler(DBAPIError, _database_error_handler)
    app.add_exception_handler(DataError, _data_error_handler)
    # Exception → Starlette's ServerErrorMiddleware: the outermost catch-all.
    app.add_exception_handler(Exception, _unhandled_error_handler)
