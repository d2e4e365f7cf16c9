"""Fine-tuning job bodies, OpenAI-shaped.

These models check the *shape* of a request. What the values mean (which LoRA ranks,
which schedulers) is the core library's business: see ``service.jobs.validate``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    model_validator,
)

from service.api.schemas.common import NAME_PATTERN
from service.db.models import Checkpoint, Job, JobEvent
from service.db.types import to_unix
from service.ids import EVENT
from service.jobs.openai_compat import translate_job_request


class MethodType(StrEnum):
    LORA = "lora"
    ADAPTER = "adapter"
    PROMPT_TUNING = "prompt_tuning"
    FEATURE_EXTRACTION = "feature_extraction"
    FULL = "full"


class Hyperparameters(BaseModel):
    """Training knobs. Unset fields take the core trainer's defaults.

    Unknown keys are kept and passed on: the core ``TrainingConfig`` is the authority on
    which knobs exist, and rejects the ones it does not know.
    """

    model_config = ConfigDict(extra="allow")

    n_epochs: int | None = Field(default=None, ge=1, le=1000)
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    learning_rate: float | None = Field(default=None, gt=0, le=10)
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1)
    lr_scheduler: str | None = Field(default=None, min_length=1, max_length=64)
    layerwise_lr_decay: float | None = Field(default=None, gt=0, le=1)
    gradual_unfreezing: bool | None = None
    weight_decay: float | None = Field(default=None, ge=0)
    max_seq_length: int | None = Field(default=None, ge=1, le=8192)
    early_stopping_patience: int | None = Field(default=None, ge=0)


MethodParams = dict[str, Any]


class MethodSpec(BaseModel):
    """``{"type": "lora", "lora": {...}, "hyperparameters": {...}}``."""

    model_config = ConfigDict(extra="forbid")

    type: MethodType
    lora: MethodParams | None = None
    adapter: MethodParams | None = None
    prompt_tuning: MethodParams | None = None
    feature_extraction: MethodParams | None = None
    full: MethodParams | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)

    @model_validator(mode="after")
    def _params_match_type(self) -> MethodSpec:
        for other in MethodType:
            if other is not self.type and getattr(self, other.value) is not None:
                raise ValueError(
                    f"parameters given under '{other.value}' but method.type is '{self.type.value}'"
                )
        return self

    def params(self) -> MethodParams:
        return dict(getattr(self, self.type.value) or {})

    def stored_method(self) -> dict[str, Any]:
        """What the ``jobs.method`` column keeps: the type and its parameters."""
        return {"type": self.type.value, self.type.value: self.params()}

    def stored_hyperparameters(self) -> dict[str, Any]:
        return self.hyperparameters.model_dump(exclude_none=True)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, min_length=1, max_length=64)
    adapter_name: str | None = Field(default=None, max_length=64, pattern=NAME_PATTERN)
    # Used in the generated adapter name when adapter_name is absent.
    suffix: str | None = Field(default=None, max_length=32, pattern=NAME_PATTERN)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    model: str | None = Field(default=None, min_length=1, max_length=256)
    # OpenAI's method types (supervised, dpo) and its deprecated top-level hyperparameters,
    # integrations and metadata are accepted too: see service.jobs.openai_compat.
    method: MethodSpec = Field(
        default_factory=lambda: MethodSpec(type=MethodType.LORA),
        description="Default: LoRA with default parameters.",
    )
    # OpenAI's method type (supervised, dpo) when the request used one: it fixes the kind of
    # training data the job accepts. Set by the validator below, never by the client.
    _openai_method: str | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _from_openai(cls, data: Any, handler: ModelWrapValidatorHandler[JobCreate]) -> JobCreate:
        # The OpenAI SDK's body (method types, deprecated top-level hyperparameters) mapped
        # onto ours first; see service.jobs.openai_compat.
        translated, openai_method = translate_job_request(data)
        job = handler(translated)
        job._openai_method = openai_method
        return job

    @property
    def openai_method(self) -> str | None:
        return self._openai_method


# --- responses -------------------------------------------------------------------------------


class JobError(BaseModel):
    code: str | None = None
    message: str
    param: str | None = None


class JobProgress(BaseModel):
    step: int
    total_steps: int | None
    epoch: float | None


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    # OpenAI's owner field: the tenant is the organization here.
    organization_id: str
    model: str
    created_at: int
    started_at: int | None
    finished_at: int | None
    status: str
    training_file: str
    validation_file: str | None
    adapter_name: str
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    seed: int
    fine_tuned_adapter: str | None
    fine_tuned_model: str | None  # OpenAI's name for the same thing
    trained_tokens: int | None
    # OpenAI's result files (metrics CSVs); loraplex reports metrics on the job and events.
    result_files: list[str] = Field(default_factory=list)
    error: JobError | None
    progress: JobProgress
    metrics: dict[str, Any]
    estimated_finish: int | None

    @classmethod
    def from_row(cls, job: Job) -> JobObject:
        return cls(
            id=job.id,
            organization_id=job.tenant_id,
            model=job.model,
            created_at=to_unix(job.created_at) or 0,
            started_at=to_unix(job.started_at),
            finished_at=to_unix(job.finished_at),
            status=job.status,
            training_file=job.training_file,
            validation_file=job.validation_file,
            adapter_name=job.adapter_name,
            method={**job.method, "hyperparameters": job.hyperparameters},
            hyperparameters=job.hyperparameters,
            seed=job.seed,
            fine_tuned_adapter=job.fine_tuned_adapter,
            fine_tuned_model=job.fine_tuned_adapter,
            trained_tokens=job.trained_tokens,
            error=JobError(**job.error) if job.error else None,
            progress=JobProgress(step=job.step, total_steps=job.total_steps, epoch=job.epoch),
            metrics=job.metrics or {},
            estimated_finish=to_unix(job.estimated_finish),
        )


def event_public_id(event_id: int) -> str:
    return f"{EVENT}-{event_id}"


def parse_event_id(public_id: str) -> int | None:
    prefix = f"{EVENT}-"
    if not public_id.startswith(prefix) or not public_id[len(prefix) :].isdigit():
        return None
    return int(public_id[len(prefix) :])


class JobEventObject(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None

    @classmethod
    def from_row(cls, event: JobEvent) -> JobEventObject:
        return cls(
            id=event_public_id(event.id),
            created_at=to_unix(event.created_at) or 0,
            level=event.level,
            message=event.message,
            type=event.type,
            data=event.data,
        )


class CheckpointObject(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str
    step_number: int
    epoch: float | None
    metrics: dict[str, Any]

    @classmethod
    def from_row(cls, ckpt: Checkpoint, adapter_name: str) -> CheckpointObject:
        return cls(
            id=ckpt.id,
            created_at=to_unix(ckpt.created_at) or 0,
            fine_tuning_job_id=ckpt.job_id,
            fine_tuned_model_checkpoint=f"{adapter_name}:ckpt-step-{ckpt.step}",
            step_number=ckpt.step,
            epoch=ckpt.epoch,
            metrics=ckpt.metrics or {},
        )
