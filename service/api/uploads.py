"""Reading uploads: bounded reads and form fields of multipart forms, and a body streamed to a
parser in a worker thread; shared by the upload routes."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, Iterator
from typing import Any

from anyio import from_thread
from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.api.middleware import limit_message
from service.datasets.reading import MAX_NAME_CHARS
from service.datasets.rows import DatasetKind
from service.datasets.store import UploadDigest
from service.errors import ErrorKind, ServiceError, invalid
from service.names import CONTROL_CHARACTER_CODE, CONTROL_CHARACTERS, has_control_characters

_READ_CHUNK = 1024 * 1024
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


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower-cased."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def require_multipart(request: Request, what: str, fields: str) -> None:
    """415 unless the body is multipart/form-data (the upload routes read files from forms)."""
    if media_type(request) != "multipart/form-data":
        raise unsupported_media_type(f"Send the {what} as multipart/form-data ({fields}).")


def unsupported_media_type(message: str) -> ServiceError:
    return ServiceError(
        message, code="unsupported_media_type", kind=ErrorKind.UNSUPPORTED_MEDIA_TYPE
    )


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


class BodyChunks:
    """A request's body as an iterable of byte chunks for a parser running in a worker thread
    (``run_in_threadpool``): each chunk is awaited on the event loop when the parser asks for
    it, so the body is parsed as it arrives, off the loop, and never held whole. Chunks are
    counted and hashed as they pass; :meth:`aclose` on the loop once the parser is done."""

    def __init__(self, request: Request) -> None:
        self._stream = request.stream()
        self._sha256 = hashlib.sha256()
        self._size = 0

    def __iter__(self) -> Iterator[bytes]:
        while True:
            try:
                chunk = from_thread.run(_next_chunk, self._stream)
            except StopAsyncIteration:
                return
            self._size += len(chunk)
            self._sha256.update(chunk)
            yield chunk

    def digest(self) -> UploadDigest:
        """The body's size and checksum, once it has been read to its end."""
        return UploadDigest(size=self._size, sha256=self._sha256.hexdigest())

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _next_chunk(stream: AsyncGenerator[bytes, None]) -> bytes:
    return await anext(stream)
