"""Adapter metadata as the API shows it: never the weights."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas.common import CREATED_AT
from service.db.models import AdapterRow
from service.db.types import to_unix

ADAPTER_EXAMPLE: dict[str, Any] = {
    "id": "adapter-0b7e4c1d9a2f6e3b8c5d1a7f",
    "object": "adapter",
    "name": "sentiment-lora",
    "version": 3,
    "method": "lora",
    "task": "classification",
    "config": {
        "format": "loraplex.adapter/1",
        "method": {"type": "lora", "r": 8, "alpha": 16.0, "dropout": 0.0},
        "head": {"task": "classification", "label_names": ["fresh", "rotten"]},
    },
    "label_names": ["fresh", "rotten"],
    "metrics": {"train_loss": 0.41, "val_accuracy": 0.83},
    "trainable_params": 74498,
    "trainable_pct": 0.328,
    "size_bytes": 300912,
    "base_model": "sentence-transformers/all-MiniLM-L6-v2",
    "base_fingerprint": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "source_job_id": "ftjob-5d2a9e7c1b3f4a6e8d0c2b4a",
    "created_at": 1764950400,
}


class AdapterObject(BaseModel):
    """A stored adapter: a small set of trained weights and a head on the shared base model."""

    model_config = ConfigDict(json_schema_extra={"examples": [ADAPTER_EXAMPLE]})

    id: str = Field(description="The adapter's id.")
    object: Literal["adapter"] = Field("adapter", description="Always `adapter`.")
    name: str = Field(
        description="The tenant-unique name: what `/predict?adapter=` and OpenAI's `model` "
        "take, and what `fine_tuned_model` holds."
    )
    version: int = Field(
        description="The tenant's adapter counter when it was stored; never reused, so a "
        "deleted and re-created name gets a new version."
    )
    method: str = Field(
        description="The fine-tuning method: lora, adapter, prompt_tuning, feature_extraction "
        "or full."
    )
    task: str = Field(
        description="`classification` (labels) or `reward` (one score per text, for "
        "preference data)."
    )
    config: dict[str, Any] = Field(
        description="The stored adapter configuration: the method's parameters, the head "
        "(task, label names) and the base model it was trained on."
    )
    label_names: list[str] | None = Field(
        description="The classes a classification adapter predicts, in output order; null "
        "for reward adapters."
    )
    metrics: dict[str, Any] = Field(
        description="Final training and validation metrics (e.g. `train_loss`, "
        "`val_accuracy`); empty for imported adapters."
    )
    trainable_params: int = Field(description="Number of trained parameters, head included.")
    trainable_pct: float = Field(
        description="Trained parameters as a percentage of the base model's parameters."
    )
    size_bytes: int = Field(description="Size of the stored weights (safetensors), in bytes.")
    base_model: str = Field(description="Name of the base model the adapter runs on.")
    base_fingerprint: str = Field(
        description="SHA-256 of the base model's weights; an adapter is only served on "
        "the base it was trained on."
    )
    source_job_id: str | None = Field(
        description="The fine-tuning job that produced it; null for imported adapters."
    )
    created_at: int = Field(description=CREATED_AT)

    @classmethod
    def from_row(cls, row: AdapterRow) -> AdapterObject:
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
