"""Dataset request and response bodies."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas.common import CREATED_AT
from service.datasets.validation import DatasetKind
from service.db.models import Dataset
from service.db.types import to_unix

KIND = (
    "`classification`: rows of `text`, `label` and optional `text_pair`; `preference`: rows "
    "of `chosen`, `rejected` and optional `prompt` (trains a reward model)."
)
LABEL_COUNTS = "Rows per label, sorted by label; null for preference data."


class DatasetCreateJSON(BaseModel):
    """The JSON form of a dataset upload; files go as multipart instead."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "kind": "classification",
                    "name": "reviews",
                    "records": [
                        {"text": "A delight from start to finish.", "label": "fresh"},
                        {"text": "Two hours I will never get back.", "label": "rotten"},
                    ],
                }
            ]
        },
    )

    kind: DatasetKind = Field(description=KIND)
    name: str | None = Field(
        default=None, min_length=1, max_length=256, description="A name to show; default: the id."
    )
    # Items are checked one by one by service.datasets.validation, which names the index.
    records: list[Any] = Field(
        description="The rows, one object each; fields other than the kind's are dropped."
    )


class DatasetObject(BaseModel):
    """A stored, validated dataset."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "file-6f1c0e9a2b4d8c3e5a7f9b1d",
                    "object": "dataset",
                    "kind": "classification",
                    "name": "reviews.jsonl",
                    "row_count": 200,
                    "label_counts": {"fresh": 104, "rotten": 96},
                    "bytes": 24576,
                    "created_at": 1764950400,
                }
            ]
        }
    )

    id: str = Field(description="The dataset's id; the same id is its `/v1/files` id.")
    object: Literal["dataset"] = Field("dataset", description="Always `dataset`.")
    kind: DatasetKind = Field(description=KIND)
    name: str = Field(description="The name given at upload, else the file's name, else the id.")
    row_count: int = Field(description="Number of rows stored.")
    label_counts: dict[str, int] | None = Field(description=LABEL_COUNTS)
    bytes: int = Field(description="Size of the upload as received, in bytes.")
    created_at: int = Field(description=CREATED_AT)

    @classmethod
    def from_row(cls, row: Dataset) -> DatasetObject:
        return cls(
            id=row.id,
            kind=DatasetKind(row.kind),
            name=row.name,
            row_count=row.row_count,
            label_counts=row.label_counts,
            bytes=row.bytes,
            created_at=to_unix(row.created_at) or 0,
        )
