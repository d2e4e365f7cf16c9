"""OpenAI's ``file`` object, as ``/v1/files`` shows a stored dataset."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from service.datasets.validation import DatasetKind
from service.db.models import Dataset
from service.db.types import to_unix

# The one OpenAI purpose a loraplex file can have: it is always training data.
FINE_TUNE_PURPOSE = "fine-tune"


class FileObject(BaseModel):
    # OpenAI's fields (the SDK's ``FileObject``) ...
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune"] = FINE_TUNE_PURPOSE
    # Files are validated whole at upload, so a stored one is always processed.
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None
    # ... and loraplex's, from the same dataset record.
    kind: DatasetKind
    row_count: int
    label_counts: dict[str, int] | None

    @classmethod
    def from_row(cls, row: Dataset) -> FileObject:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=to_unix(row.created_at) or 0,
            filename=row.name,
            kind=DatasetKind(row.kind),
            row_count=row.row_count,
            label_counts=row.label_counts,
        )


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
