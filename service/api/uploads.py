"""Reading uploads: bounded reads and form fields of multipart forms, and a JSON body spooled
for a parser in a worker thread; shared by the upload routes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from tempfile import SpooledTemporaryFile
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.api.errors import media_type
from service.api.middleware import limit_message
from service.datasets.reading import MAX_NAME_CHARS
from service.datasets.rows import DatasetKind
from service.datasets.store import UploadDigest
from service.errors import ErrorKind, ServiceError, invalid, unsupported_media_type
from service.names import CONTROL_CHARACTER_CODE, CONTROL_CHARACTERS, has_control_characters

_READ_CHUNK = 1024 * 1024
_SPOOL_IN_MEMORY = 1024 * 1024  # a JSON body past this waits on disk
DATASET_KINDS = [k.value for k in DatasetKind]


def dataset_upload_body(required: list[str], fields: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI ``multipart/form-data`` content for a dataset file upload plus form ``fields``.

    The upload routes read the form by hand (one route, two bodies, streamed), so FastAPI
    cannot derive this; the ``file`` part is the same on every one of them.
    """
    file_part = {
        "type": "string",
        "format": "binary",
        "description": "JSON Lines (.jsonl) or CSV with a header row.",
    }
    return {
        "schema": {
            "type": "object",
            "required": ["file", *required],
            "properties": {"file": file_part, **fields},
        }
    }


def require_multipart(request: Request, what: str, fields: str) -> None:
    """415 unless the body is multipart/form-data (the upload routes read files from forms)."""
    if media_type(request) != "multipart/form-data":
        raise unsupported_media_type(f"Send the {what} as multipart/form-data ({fields}).")


async def read_upload(upload: UploadFile, limit: int, param: str = "file") -> bytes:
    """The file's bytes, refusing (413) as soon as it passes ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise ServiceError(
                limit_message(limit),
                code="request_too_large",
                param=param,
                kind=ErrorKind.TOO_LARGE,
            )
        chunks.append(chunk)
    return b"".join(chunks)


def dataset_kind(value: Any) -> DatasetKind:
    """A ``kind`` form field as a dataset kind; 422 ``invalid_kind`` naming the kinds if not one."""
    if not isinstance(value, str) or value not in DATASET_KINDS:
        raise invalid(
            f"kind must be one of {', '.join(DATASET_KINDS)}; got {value!r}.",
            "kind",
            "invalid_kind",
        )
    return DatasetKind(value)


def form_text(
    value: Any, param: str, max_length: int = MAX_NAME_CHARS, what: str | None = None
) -> str | None:
    """A text form field (``what`` names it in messages, default ``param``); None when absent
    or empty, 422 when a file, too long or holding a control character (the rule of every
    name, :mod:`service.names`)."""
    if value is None or value == "":
        return None
    what = what or param
    if not isinstance(value, str):
        raise invalid(f"{what} must be a text field.", param)
    if len(value) > max_length:
        raise invalid(f"{what} must be at most {max_length} characters.", param)
    if has_control_characters(value):
        raise invalid(
            f"{what} must not contain {CONTROL_CHARACTERS}.", param, CONTROL_CHARACTER_CODE
        )
    return value


def upload_name(upload: UploadFile) -> str | None:
    """The name an uploaded file gives its dataset when the form names none: checked as a
    ``name`` field is (a file's name is the client's text too), refused naming ``file``."""
    return form_text(upload.filename, "file", what="The file's name")


class SpooledBody:
    """A request's body, received on the event loop, then read in chunks by a parser running
    in a worker thread (``run_in_threadpool``).

    The body is received whole before a thread is taken: a parser thread that waited for a
    slow client's next chunk held one of the thread pool's 40 tokens, which every sync route
    and key lookup needs, and 41 clients sending a JSON upload a byte a second stalled every
    tenant's requests, ``/healthz`` included. Past 1 MiB it waits on disk (Starlette's
    ``UploadFile`` spooling, as multipart files do), so memory stays bounded whatever the
    body's size; the middleware bounds that size. Counted and hashed as it arrives;
    :meth:`aclose` once the parser is done."""

    def __init__(self) -> None:
        # Closed by aclose, which the caller runs in a finally.
        self._file = UploadFile(SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY))  # noqa: SIM115
        self._sha256 = hashlib.sha256()
        self._size = 0

    @classmethod
    async def receive(cls, request: Request) -> SpooledBody:
        body = cls()
        try:
            async for chunk in request.stream():
                body._size += len(chunk)
                body._sha256.update(chunk)
                await body._file.write(chunk)
            await body._file.seek(0)
        except BaseException:
            await body.aclose()
            raise
        return body

    def __iter__(self) -> Iterator[bytes]:
        """The body's chunks, read from the spool (in the parser's thread: a blocking read)."""
        while chunk := self._file.file.read(_READ_CHUNK):
            yield chunk

    def digest(self) -> UploadDigest:
        """The body's size and checksum."""
        return UploadDigest(size=self._size, sha256=self._sha256.hexdigest())

    async def aclose(self) -> None:
        await self._file.close()
