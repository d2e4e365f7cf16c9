"""The errors the service raises, in its own words: what went wrong, not which HTTP status.

Domain code (jobs, datasets, adapters, serving) raises :class:`ServiceError`, or a subclass
that presets its ``code`` and ``param``, and imports nothing from the web framework. Its
``kind`` says what sort of failure it is; ``service.api.errors`` is the one place that turns a
kind into a status code, an error ``type`` and headers, so a worker, a CLI or a second API
can reuse the domain code and choose their own rendering.

Every subclass takes the same arguments in the same order: ``(message, *, code, param)``.
``core.errors`` stays independent of the service (core never imports it); where core's errors
reach a request, the service module that calls core maps them (``service.jobs.validate`` for
``ConfigError``, ``service.adapters.transfer`` for ``AdapterFormatError``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class ErrorKind(StrEnum):
    """What sort of failure an error is; each maps to one HTTP status in ``service.api``."""

    INVALID = "invalid"  # a value the caller sent is wrong (422)
    UNSUPPORTED = "unsupported"  # a well-formed request for a feature loraplex lacks (400)
    NOT_FOUND = "not_found"  # no such object for this caller, or someone else's (404)
    CONFLICT = "conflict"  # the object's state forbids it: a taken name, a finished job (409)
    QUOTA = "quota"  # a tenant limit is reached; retrying will not help (429)
    UNAVAILABLE = "unavailable"  # a transient lack of capacity or readiness; retry (503)
    UNAUTHENTICATED = "unauthenticated"  # no valid credentials (401)
    FORBIDDEN = "forbidden"  # valid credentials without the right to do this (403)
    TOO_LARGE = "too_large"  # an upload over the configured limit (413)
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # a body in a format not read here (415)
    INTERNAL = "internal"  # our failure, not the caller's (500)


class ServiceError(Exception):
    """A failure to report to the caller: ``message`` for people, ``code`` for programs.

    ``param`` names the request field at fault (dotted path) or is None. ``retry_after`` is
    how many seconds a caller should wait before retrying, where that is known. Subclasses
    preset ``default_kind``, ``default_code`` and ``default_param``.
    """

    default_kind: ClassVar[ErrorKind] = ErrorKind.INVALID
    default_code: ClassVar[str | None] = None
    default_param: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        kind: ErrorKind | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind or self.default_kind
        self.code = code if code is not None else self.default_code
        self.param = param if param is not None else self.default_param
        self.retry_after = retry_after


# --- the common cases --------------------------------------------------------------------------


def not_found(what: str, id: str, param: str | None = None) -> ServiceError:
    # Also used for other tenants' objects: their existence is never confirmed (no 403).
    return ServiceError(
        f"No {what} found with id '{id}'.",
        code=f"{what}_not_found",
        param=param,
        kind=ErrorKind.NOT_FOUND,
    )


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ServiceError:
    return ServiceError(message, code=code, param=param, kind=ErrorKind.INVALID)


def unsupported(message: str, param: str, code: str = "unsupported_parameter") -> ServiceError:
    # OpenAI answers 400 for a feature it does not offer, so code written against OpenAI that
    # catches BadRequestError keeps working; malformed values stay INVALID (422).
    return ServiceError(message, code=code, param=param, kind=ErrorKind.UNSUPPORTED)


def unsupported_media_type(message: str) -> ServiceError:
    return ServiceError(
        message, code="unsupported_media_type", kind=ErrorKind.UNSUPPORTED_MEDIA_TYPE
    )


def conflict(message: str, param: str | None = None, code: str = "conflict") -> ServiceError:
    return ServiceError(message, code=code, param=param, kind=ErrorKind.CONFLICT)


def quota_exceeded(message: str, code: str) -> ServiceError:
    return ServiceError(message, code=code, kind=ErrorKind.QUOTA)


def unavailable(
    message: str, code: str = "unavailable", retry_after: int | None = None
) -> ServiceError:
    return ServiceError(message, code=code, kind=ErrorKind.UNAVAILABLE, retry_after=retry_after)
