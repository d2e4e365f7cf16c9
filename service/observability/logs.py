"""Credentials out of the access log.

Keys belong in the ``Authorization`` header, and a key sent as ``?api_key=`` is refused; but
uvicorn's access log writes the request line as it came, so the refused key would sit in the
log whole. :class:`RedactCredentials` masks such query values before any handler formats
the record.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import quote

from service.tenants.keys import KEY_PREFIX

ACCESS_LOGGER = "uvicorn.access"
REDACTED = "[REDACTED]"

# Query parameters a client may put a secret in, whatever this service reads: any name that
# holds one of these words (`x-api-key`, `authorization`, `api%5Fkey` encoded, `bearer`).
_CREDENTIAL = re.compile(
    r"(?i)([?&][^=&#\s]*(?:key|token|auth|password|passwd|secret|bearer|credential)"
    r"[^=&#\s]*=)[^&#\s]*"
)
# A key of this service wherever it stands (a path segment, a parameter of any name): the
# prefix plus what ``generate_api_key`` appends, 43 URL-safe characters. From 20 on, so most
# of a cut key goes too, while a name like `lpx_sentiment` stays readable.
_KEY = re.compile(rf"{re.escape(KEY_PREFIX)}[A-Za-z0-9_-]{{20,}}")


def redact_url(url: str) -> str:
    """``url`` with the values of credential-like query parameters, and anything shaped like
    one of this service's keys, replaced."""
    return _KEY.sub(REDACTED, _CREDENTIAL.sub(rf"\g<1>{REDACTED}", url))


class RedactCredentials(logging.Filter):
    """Masks credentials in uvicorn access records, whose args are ``(client, method,
    path with query, http version, status)``: :func:`redact_url`'s, and ``secrets`` (the
    admin key, which has no shape of its own), as sent or percent-encoded."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = sorted(
            {form for s in secrets if s for form in (s, quote(s, safe=""))}, key=len, reverse=True
        )

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            url = redact_url(args[2])
            for secret in self._secrets:
                url = url.replace(secret, REDACTED)
            record.args = (*args[:2], url, *args[3:])
        return True


def redact_access_log(secrets: Iterable[str] = ()) -> None:
    """Install :class:`RedactCredentials` (masking ``secrets`` too) on uvicorn's access
    logger, in place of one installed before. Call it after ``uvicorn.Config`` is made: that
    is when uvicorn configures its loggers."""
    access = logging.getLogger(ACCESS_LOGGER)
    for old in [f for f in access.filters if isinstance(f, RedactCredentials)]:
        access.removeFilter(old)
    access.addFilter(RedactCredentials(secrets))
