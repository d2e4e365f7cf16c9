"""Training hyper-parameters: one validated, JSON round-trippable object per job."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel as PydanticModel
from pydantic import ConfigDict, Field, ValidationError, model_validator

from core.errors import ConfigError

# "auto" learning rates per method. Parameter-efficient methods train few, freshly initialised
# tensors and want a large step; full fine-tuning moves pretrained weights and wants a small one.
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "lora": 1e-3,
    "adapter": 1e-3,
    "prompt_tuning": 3e-2,
    "feature_extraction": 2e-3,
    "full": 5e-5,
    "scratch": 1e-4,
}
FALLBACK_LEARNING_RATE = 1e-3
# Used when neither warmup_ratio nor warmup_steps is set.
DEFAULT_WARMUP_RATIO = 0.1

MetricName = Literal["loss", "accuracy", "macro_f1"]


class _FieldError(ValueError):
    """A cross-field check failure that still names one field (pydantic would report none)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class TrainingConfig(PydanticModel):
    """How to train. Every field is validated; :func:`parse_training_config` names bad fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_epochs: int = Field(3, ge=1, le=1000)
    # Overrides n_epochs: training runs through as many (partial) epochs as needed.
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1, le=4096)
    # Batch size for validation (no gradients, so it can be larger); None = 2 x batch_size.
    eval_batch_size: int | None = Field(None, ge=1, le=8192)
    learning_rate: float | Literal["auto"] = "auto"
    # Warm-up as a fraction of all steps or as a step count (not both). Neither: 10 %.
    warmup_ratio: float | None = Field(None, ge=0.0, le=1.0)
    warmup_steps: int | None = Field(None, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    # lr x decay^(distance from the top encoder layer); head at full lr. 1.0 = off.
    layerwise_lr_decay: float = Field(1.0, gt=0.0, le=1.0)
    # True = unfreeze one encoder layer per epoch from the top (head alone in epoch 0,
    # embeddings last); an int n = n layers per epoch. False / 0 = everything from the start.
    gradual_unfreezing: bool | int = False
    weight_decay: float = Field(0.01, ge=0.0, le=10.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = Field(1e-8, gt=0.0)
    # None or 0 = no clipping.
    max_grad_norm: float | None = Field(1.0, ge=0.0)
    # Capped at the base model's own limit by the trainer.
    max_seq_length: int = Field(128, ge=4, le=8192)
    # Evaluations without improvement before stopping; None = never stop early.
    early_stopping_patience: int | None = Field(None, ge=1)
    # Validate every k steps; None = at the end of every epoch. Always once at the end.
    eval_every_steps: int | None = Field(None, ge=1)
    # Validation metric that picks the best checkpoint. "accuracy" is pairwise for reward.
    # Not loss by default: on small validation sets the loss of a model that grows more
    # confident rises while its accuracy still improves, and selecting on it kept epoch-1
    # weights 15-20 points worse on held-out Rotten Tomatoes rows.
    metric_for_best: MetricName = "accuracy"
    # Held out from the training rows when no validation set is given; 0 = no validation.
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    bucket_by_length: bool = True
    # Reward models (TRL RewardTrainer semantics): loss = -logsigmoid(r_c - r_r - margin)
    # + center_rewards_coefficient * mean((r_c + r_r)^2). A row's own "margin" wins.
    margin: float = 0.0
    center_rewards_coefficient: float | None = Field(None, ge=0.0)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    # Checkpoint callback every N steps (and always at epoch ends); None = epoch ends only.
    checkpoint_every_steps: int | None = Field(None, ge=1)
    # Advisory thread budget for the *caller*: torch.set_num_threads is process-wide, so the
    # library never calls it; the worker process should, once, at start-up.
    num_threads: int | None = Field(None, ge=1, le=1024)

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise _FieldError("warmup_steps", "set warmup_ratio or warmup_steps, not both")
        if isinstance(self.learning_rate, float) and not 0.0 < self.learning_rate <= 10.0:
            raise _FieldError("learning_rate", "must be in (0, 10] or 'auto'")
        g = self.gradual_unfreezing
        if not isinstance(g, bool) and g < 0:
            raise _FieldError("gradual_unfreezing", "must be a bool or a layer count >= 0")
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise _FieldError("adam_betas", "must be in [0, 1)")
        return self

    # --- resolved values -------------------------------------------------------------------

    def resolved_learning_rate(self, method_type: str) -> float:
        if self.learning_rate == "auto":
            return DEFAULT_LEARNING_RATES.get(method_type, FALLBACK_LEARNING_RATE)
        return float(self.learning_rate)

    def resolved_warmup_steps(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        ratio = DEFAULT_WARMUP_RATIO if self.warmup_ratio is None else self.warmup_ratio
        return int(ratio * total_steps)

    @property
    def unfreeze_layers_per_epoch(self) -> int:
        """Encoder layers unfrozen per epoch; 0 = gradual unfreezing off."""
        g = self.gradual_unfreezing
        if isinstance(g, bool):
            return 1 if g else 0
        return g

    def resolved_eval_batch_size(self) -> int:
        return self.eval_batch_size or 2 * self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_training_config(params: dict[str, Any] | TrainingConfig | None) -> TrainingConfig:
    """Validate ``params``; raise :class:`ConfigError` naming the first bad field."""
    if isinstance(params, TrainingConfig):
        return params
    try:
        return TrainingConfig(**(params or {}))
    except ValidationError as e:
        err = e.errors()[0]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldError):
            raise ConfigError(cause.field, str(cause)) from None
        # The first location element is the field; deeper ones are union branches or indexes.
        field = str(err["loc"][0]) if err["loc"] else "training"
        raise ConfigError(field, err["msg"]) from None
    except TypeError as e:
        raise ConfigError("training", str(e)) from None
