"""Credentials out of the access log.

Keys belong in the ``Authorization`` header, and a key sent as ``?api_key=`` is refused; but
uvicorn's access log writes the request line as it came, so the refused key would sit in the
log whole. :class:`RedactCredentials` masks such query values before any handler formats
the record.
"""

from __future__ import annotations

import logging
import re

ACCESS_LOGGER = "uvicorn.access"
REDACTED = "[REDACTED]"

# Query parameters a client may put a secret in, whatever this service reads.
_CREDENTIAL = re.compile(
    r"(?i)([?&](?:api[-_]?key|key|token|access[-_]?token|auth|password|secret)=)[^&#\s]*"
)


def redact_url(url: str) -> str:
    """``url`` with the values of credential-like query parameters replaced."""
    return _CREDENTIAL.sub(rf"\g<1>{REDACTED}", url)


class RedactCredentials(logging.Filter):
    """Masks credentials in uvicorn access records, whose args are ``(client, method,
    path with query, http version, status)``."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (*args[:2], redact_url(args[2]), *args[3:])
        return True


def redact_access_log() -> None:
    """Install :class:`RedactCredentials` on uvicorn's access logger (once). Call it after
    ``uvicorn.Config`` is made: that is when uvicorn configures its loggers."""
    access = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, RedactCredentials) for f in access.filters):
        access.addFilter(RedactCredentials())
