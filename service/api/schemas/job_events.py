"""What a job reports as it runs: its events (the log, the SSE stream's items) and its
checkpoints, OpenAI-shaped. The job object itself is in ``service.api.schemas.jobs``."""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas.common import CREATED_AT
from service.db.models import Checkpoint, JobEvent
from service.db.types import to_unix
from service.ids import EVENT
from service.jobs.checkpoints import checkpoint_model
from service.jobs.events import EventLevel, EventType


def event_public_id(event_id: int) -> str:
    return f"{EVENT}-{event_id}"


# Event ids are database integers: a larger number can name no event, and the database
# driver would refuse to bind it (SQLite raises OverflowError).
_MAX_EVENT_ID = 2**63 - 1


def parse_event_id(public_id: str) -> int | None:
    """The database id in ``ftevent-<n>``, or None where ``public_id`` cannot name an event."""
    prefix = f"{EVENT}-"
    digits = public_id.removeprefix(prefix)
    # ASCII digits only: str.isdigit() also passes '²', which int() then refuses.
    if not public_id.startswith(prefix) or not (digits.isascii() and digits.isdigit()):
        return None
    number = int(digits)
    return number if number <= _MAX_EVENT_ID else None


# Migration 0009 rewrote the stored events with these values; a process still on the code
# before it (a rolling upgrade) may write one more, which must not fail the whole page.
_OLD_LEVELS = {"warning": "warn"}
_OLD_TYPES = {"checkpoint": "message"}


class JobEventObject(BaseModel):
    """Something that happened to a job: a status change, training metrics, a checkpoint."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "object": "fine_tuning.job.event",
                    "id": "ftevent-12",
                    "created_at": 1764950460,
                    "level": "info",
                    "message": "Step 40/150: training loss=0.5213",
                    "type": "metrics",
                    "data": {"step": 40, "total_steps": 150, "train_loss": 0.5213, "lr": 0.00047},
                }
            ]
        }
    )

    object: Literal["fine_tuning.job.event"] = Field(
        "fine_tuning.job.event", description="Always `fine_tuning.job.event`."
    )
    id: str = Field(description="The event's id; a cursor for `after` and `Last-Event-ID`.")
    created_at: int = Field(description=CREATED_AT)
    level: EventLevel = Field(description="`info`, `warn` or `error` (OpenAI's levels).")
    message: str = Field(description="What happened, for people.")
    type: EventType = Field(
        description="`message` (status changes, checkpoints and notes) or `metrics` (training "
        "or validation metrics in `data`), OpenAI's types."
    )
    data: dict[str, Any] | None = Field(
        description="Machine-readable details: step, epoch and metrics for `metrics` events; "
        "`checkpoint_id`, `step` and `epoch` for a checkpoint's message (`Checkpoint created "
        "at step N`); the attempts, code or step of some others. `step_loss` is the step's "
        "loss; `train_loss` is the epoch's running mean, except in a chat job's events, where "
        "it is the step's loss (OpenAI's)."
    )

    @classmethod
    def from_row(cls, event: JobEvent) -> JobEventObject:
        return cls(
            id=event_public_id(event.id),
            created_at=to_unix(event.created_at) or 0,
            # Checked by pydantic: a value neither OpenAI's nor mapped is an error.
            level=cast(EventLevel, _OLD_LEVELS.get(event.level, event.level)),
            message=event.message,
            type=cast(EventType, _OLD_TYPES.get(event.type, event.type)),
            data=event.data,
        )


class CheckpointObject(BaseModel):
    """A resumable checkpoint a job saved while training, as OpenAI's checkpoint object."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "object": "fine_tuning.job.checkpoint",
                    "id": "ftckpt-3e9b1a7c5d2f4e6a8c0b1d3f",
                    "created_at": 1764950520,
                    "fine_tuning_job_id": "ftjob-5d2a9e7c1b3f4a6e8d0c2b4a",
                    "fine_tuned_model_checkpoint": "sentiment-lora:ckpt-step-100",
                    "step_number": 100,
                    "epoch": 2.0,
                    "metrics": {
                        "step": 100.0,
                        "train_loss": 0.52,
                        "valid_loss": 0.44,
                        "full_valid_loss": 0.44,
                        "val_loss": 0.44,
                        "val_accuracy": 0.81,
                    },
                }
            ]
        }
    )

    object: Literal["fine_tuning.job.checkpoint"] = Field(
        "fine_tuning.job.checkpoint", description="Always `fine_tuning.job.checkpoint`."
    )
    id: str = Field(description="The checkpoint's id.")
    created_at: int = Field(description=CREATED_AT)
    fine_tuning_job_id: str = Field(description="The job that saved it.")
    fine_tuned_model_checkpoint: str = Field(
        description="Its model name: the job's adapter name and the step. While the checkpoint "
        "keeps its state (the newest 2 of a job), the name serves as a model wherever an "
        "adapter's does (`model` of chat and text completions, `adapter` of `/predict` and "
        "`/reward/compare`), with the weights of that step; it names the checkpoint of the "
        "tenant's most recent job training that adapter name. Once the state is dropped (or "
        "the adapter deleted, which drops its jobs' states) it is a 404."
    )
    step_number: int = Field(description="The optimizer step it was saved at.")
    epoch: float | None = Field(description="The epoch it was saved in, if known.")
    metrics: dict[str, Any] = Field(
        description="OpenAI's checkpoint metrics where they exist: `step`, `train_loss` (the "
        "epoch's running mean), and from the last validation, if there was one yet, "
        "`valid_loss` and `full_valid_loss` (the same number: validation scores the whole "
        "set) and a chat job's `valid_mean_token_accuracy` and "
        "`full_valid_mean_token_accuracy`; beside them that validation's metrics under "
        "loraplex's names (`val_loss`, `val_accuracy`, `val_macro_f1`, ...)."
    )

    @classmethod
    def from_row(cls, ckpt: Checkpoint, adapter_name: str) -> CheckpointObject:
        return cls(
            id=ckpt.id,
            created_at=to_unix(ckpt.created_at) or 0,
            fine_tuning_job_id=ckpt.job_id,
            fine_tuned_model_checkpoint=checkpoint_model(adapter_name, ckpt.step),
            step_number=ckpt.step,
            epoch=ckpt.epoch,
            metrics=_stored_metrics(ckpt.metrics or {}, ckpt.step),
        )


def _stored_metrics(metrics: dict[str, Any], step: int) -> dict[str, Any]:
    """A checkpoint row's metrics as the API names them. Rows written before checkpoints
    carried OpenAI's names hold the training loss as ``val_train_loss`` (every such row has
    it): read as ``train_loss``, with the ``step``."""
    if "val_train_loss" not in metrics:
        return metrics
    rest = {k: v for k, v in metrics.items() if k != "val_train_loss"}
    return {"step": float(step), "train_loss": metrics["val_train_loss"], **rest}
