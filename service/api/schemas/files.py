"""OpenAI's ``file`` object, as ``/v1/files`` shows a stored dataset."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas.common import CREATED_AT
from service.api.schemas.datasets import KIND, LABEL_COUNTS
from service.datasets.rows import DatasetKind
from service.db.models import Dataset
from service.db.types import to_unix

# The one OpenAI purpose a loraplex file can have: it is always training data.
FINE_TUNE_PURPOSE = "fine-tune"

FILE_ID = "file-6f1c0e9a2b4d8c3e5a7f9b1d"


class FileObject(BaseModel):
    """A stored dataset in the shape of OpenAI's file object, with loraplex's extras."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": FILE_ID,
                    "object": "file",
                    "bytes": 24576,
                    "created_at": 1764950400,
                    "filename": "reviews.jsonl",
                    "purpose": "fine-tune",
                    "status": "processed",
                    "expires_at": None,
                    "status_details": None,
                    "kind": "classification",
                    "row_count": 200,
                    "label_counts": {"fresh": 104, "rotten": 96},
                }
            ]
        }
    )

    # OpenAI's fields (the SDK's ``FileObject``) ...
    id: str = Field(description="The file's id; the same id is its `/v1/datasets` id.")
    object: Literal["file"] = Field("file", description="Always `file`.")
    bytes: int = Field(description="Size of the upload as received, in bytes.")
    created_at: int = Field(description=CREATED_AT)
    filename: str = Field(description="The uploaded file's name.")
    purpose: Literal["fine-tune"] = Field(
        FINE_TUNE_PURPOSE, description="Always `fine-tune`: loraplex files are training data."
    )
    status: Literal["processed"] = Field(
        "processed", description="Always `processed`: files are validated whole at upload."
    )
    expires_at: int | None = Field(None, description="Always null: files are kept until deleted.")
    status_details: str | None = Field(None, description="Always null (OpenAI's field).")
    # ... and loraplex's, from the same dataset record.
    kind: DatasetKind = Field(description=KIND)
    row_count: int = Field(description="Number of rows stored.")
    label_counts: dict[str, int] | None = Field(description=LABEL_COUNTS)

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
    """What deleting a file answers."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"id": FILE_ID, "object": "file", "deleted": True}]}
    )

    id: str = Field(description="Id of the deleted file.")
    object: Literal["file"] = Field("file", description="Always `file`.")
    deleted: bool = Field(True, description="Always true: a failed deletion answers an error.")
