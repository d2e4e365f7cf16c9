"""Dataset request and response bodies."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.datasets.validation import DatasetKind
from service.db.models import Dataset
from service.db.types import to_unix


class DatasetCreateJSON(BaseModel):
    """The JSON form of ``POST /v1/datasets``; files go as multipart instead."""

    model_config = ConfigDict(extra="forbid")

    kind: DatasetKind
    name: str | None = Field(default=None, min_length=1, max_length=256)
    # Items are checked one by one by service.datasets.validation, which names the index.
    records: list[Any]


class DatasetObject(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    kind: DatasetKind
    name: str
    row_count: int
    label_counts: dict[str, int] | None
    bytes: int
    created_at: int

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
