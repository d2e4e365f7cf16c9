"""Adapter metadata as the API shows it: never the weights."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from service.db.models import Adapter
from service.db.types import to_unix


class AdapterObject(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    version: int
    method: str
    task: str
    config: dict[str, Any]
    label_names: list[str] | None
    metrics: dict[str, Any]
    trainable_params: int
    trainable_pct: float
    size_bytes: int
    base_model: str
    base_fingerprint: str
    source_job_id: str | None
    created_at: int

    @classmethod
    def from_row(cls, row: Adapter) -> AdapterObject:
        return cls(
            id=row.id,
            name=row.name,
            version=row.version,
            method=row.method,
            task=row.task,
            config=row.config,
            label_names=row.label_names,
            metrics=row.metrics or {},
            trainable_params=row.trainable_params,
            trainable_pct=row.trainable_pct,
            size_bytes=row.size_bytes,
            base_model=row.base_model,
            base_fingerprint=row.base_fingerprint,
            source_job_id=row.source_job_id,
            created_at=to_unix(row.created_at) or 0,
        )
