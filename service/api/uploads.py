"""Reading multipart uploads: bounded reads and form fields, shared by the upload routes."""

from __future__ import annotations

from typing import Any

from starlette.datastructures import UploadFile

from service.api.errors import invalid, too_large

_READ_CHUNK = 1024 * 1024


async def read_upload(upload: UploadFile, limit: int, param: str = "file") -> bytes:
    """The file's bytes, refusing (413) as soon as it passes ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise too_large(limit, param)
        chunks.append(chunk)
    return b"".join(chunks)


def form_text(value: Any, param: str, max_length: int = 256) -> str | None:
    """A text form field; None when absent or empty, 422 when a file or too long."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise invalid(f"{param} must be a text field.", param)
    if len(value) > max_length:
        raise invalid(f"{param} must be at most {max_length} characters.", param)
    return value
