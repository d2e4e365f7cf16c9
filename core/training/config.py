"""Training hyper-parameters: one validated, JSON round-trippable object per job."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import ConfigError

# "auto" learning rates per method (see the learning_rate field's description). LoRA's 1e-3
# suits reward models too: HH-RLHF validation pair accuracy (python -m bench.reward_quality
# --validation --cases default --epochs 1) 0.659 at 1e-3, 0.651 at 2e-3, 0.668 without
# warm-up, all within one standard error (2.5 points on 370 pairs), so one rate for all tasks.
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "lora": 1e-3,
    "adapter": 1e-3,
    "prompt_tuning": 3e-2,
    "feature_extraction": 2e-3,
    "full": 5e-5,
    "scratch": 1e-4,
}
FALLBACK_LEARNING_RATE = 1e-3
# max_seq_length when it is not set, per task. Reward: 128, not MiniLM's own limit of 256:
# held-out HH-RLHF pair accuracy 0.633 at 128 and 0.605 at 256 with the default head (mean
# over the response's tokens), 0.605 and 0.603 pooling every token (1 epoch on 1,850 pairs,
# issue 15), and 256 took 1.3x the time. Truncation keeps the response first, so the turns
# that decide a pair survive either way.
# Chat and DPO: a decoder's conversation (prompt and reply) in one sequence.
DEFAULT_MAX_SEQ_LENGTHS: dict[str, int] = {
    "classification": 128,
    "reward": 128,
    "chat": 512,
    "dpo": 512,
}
# Used when neither warmup_ratio nor warmup_steps is set.
DEFAULT_WARMUP_RATIO = 0.1

MetricName = Literal["loss", "accuracy", "macro_f1"]
# Ranges of the union and tuple fields, declared on their members so they show in the schema.
PositiveRate = Annotated[float, Field(gt=0.0, le=10.0)]
# A preference margin (the job's, or a row's own) is at most this far from 0, in the reward
# head's units (a logit gap: trained reward models score pairs a few units apart). It goes
# into the float32 loss, where a finite JSON number such as 1e300 is infinite.
MAX_ABS_MARGIN = 1_000.0
UnfreezeCount = Annotated[int, Field(ge=0)]
AdamBeta = Annotated[float, Field(ge=0.0, lt=1.0)]
# Settings that only preference (reward-model) training reads.
REWARD_ONLY_SETTINGS = frozenset(
    {
        "margin",
        "center_rewards_coefficient",
        "disable_dropout",
        "split_shared_prefix",
        "average_epochs",
    }
)
# Settings that only DPO training (task "dpo" on a decoder base) reads.
DPO_ONLY_SETTINGS = frozenset({"beta", "label_smoothing"})
# Settings that only the tasks with a head read (classification, reward): chat and DPO train
# the base's own output layer, so there is no head to unfreeze from.
HEAD_ONLY_SETTINGS = frozenset({"gradual_unfreezing"})
HEAD_TASKS = frozenset({"classification", "reward"})


def settings_unread_by(task: str) -> frozenset[str]:
    """The training settings only another task reads: none of them changes a ``task`` run."""
    unread = REWARD_ONLY_SETTINGS if task != "reward" else frozenset()
    unread |= DPO_ONLY_SETTINGS if task != "dpo" else frozenset()
    return unread | (HEAD_ONLY_SETTINGS if task not in HEAD_TASKS else frozenset())


def batches_per_epoch(rows: int, batch_size: int) -> int:
    """Batches in one pass over ``rows`` rows; the last one may be short."""
    return -(-rows // batch_size)


def held_out_rows(rows: int, fraction: float) -> int:
    """Rows of one class (or of all preference rows) that ``fraction`` holds out: rounded half
    up, but at least one row of every class stays in training."""
    return min(int(rows * fraction + 0.5), rows - 1)


def hold_out_required(config: TrainingConfig) -> bool:
    """Whether a file too small for ``validation_fraction`` to hold out a row is an error: where
    the fraction was asked for. The default's is not: a small file trains without validation
    (a 4-row file failed its job)."""
    return "validation_fraction" in config.model_fields_set


def nothing_held_out(rows: int, fraction: float) -> str:
    """What is wrong with a file whose ``fraction`` holds out no row (``held_out_rows`` is 0
    for every class): said alike by job creation and the trainer's split."""
    return (
        f"too few rows ({rows}) to hold out {fraction:.0%} for validation: provide a "
        "validation set, add rows, or set validation_fraction to 0"
    )


class _FieldError(ValueError):
    """A cross-field check failure that still names one field (pydantic would report none)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class TrainingConfig(BaseModel):
    """How to train. Every field is validated; :func:`parse_training_config` names bad fields.

    Each field's description, default and range are the one definition of that setting: the
    API's request schema, ``GET /v1/methods`` and the dashboard's form are derived from them.
    """

    # Every setting is finite: Python's JSON parser reads NaN and Infinity, which pass a field
    # with no bound (margin: NaN trained a NaN model that still "succeeded") and Infinity a
    # lower bound alone (adam_epsilon > 0).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    n_epochs: int = Field(
        3,
        ge=1,
        le=1000,
        description="Passes over the training rows (ignored when max_steps is set).",
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Optimizer steps to train for; overrides n_epochs (training runs through as "
        "many, possibly partial, epochs as needed). null = n_epochs decides.",
    )
    batch_size: int = Field(16, ge=1, le=4096, description="Training rows per optimizer step.")
    eval_batch_size: int | None = Field(
        None,
        ge=1,
        le=8192,
        description="Rows per validation batch (no gradients, so it can be larger); "
        "null = 2 x batch_size.",
    )
    learning_rate: PositiveRate | Literal["auto"] = Field(
        "auto",
        description="Peak learning rate, in (0, 10]. 'auto' = the method's default: "
        "parameter-efficient methods train few fresh tensors and want a large step, full "
        "fine-tuning moves pretrained weights and wants a small one.",
    )
    warmup_ratio: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Linear warm-up over this fraction of all steps. Give warmup_ratio or "
        f"warmup_steps, not both; neither = {DEFAULT_WARMUP_RATIO:g}.",
    )
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="Linear warm-up over this many steps (capped at the total). Give "
        "warmup_ratio or warmup_steps, not both.",
    )
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear",
        description="Learning-rate decay after warm-up: to 0 linearly, along a cosine, or none.",
    )
    layerwise_lr_decay: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Each encoder layer's learning rate is lr x decay^(its distance from the top "
        "layer); the head trains at the full rate. 1.0 = off.",
    )
    gradual_unfreezing: bool | UnfreezeCount = Field(
        False,
        description="true = unfreeze one encoder layer per epoch from the top (the head alone in "
        "epoch 0, the embeddings last); an integer n = n layers per epoch. false or 0 = train "
        "everything from the start.",
    )
    weight_decay: float = Field(
        0.01, ge=0.0, le=10.0, description="AdamW's decoupled weight decay."
    )
    adam_betas: tuple[AdamBeta, AdamBeta] = Field(
        (0.9, 0.999), description="AdamW's (beta1, beta2), each in [0, 1)."
    )
    adam_epsilon: float = Field(1e-8, gt=0.0, description="AdamW's epsilon.")
    max_grad_norm: float | None = Field(
        1.0, ge=0.0, description="Clip the gradient's global norm to this; null or 0 = no clipping."
    )
    max_seq_length: int | None = Field(
        None,
        ge=4,
        le=8192,
        description="Tokens per input; longer inputs are truncated (a preference pair keeps its "
        "response and loses the start of its prompt). null = "
        f"{DEFAULT_MAX_SEQ_LENGTHS['classification']} for classification, "
        f"{DEFAULT_MAX_SEQ_LENGTHS['reward']} for preference pairs, "
        f"{DEFAULT_MAX_SEQ_LENGTHS['chat']} for chat and DPO conversations (which lose the "
        "start of their context, never the final reply's start). Capped at the base model's "
        "own limit (less prompt tuning's virtual tokens).",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop after this many evaluations without improvement of metric_for_best; "
        "null = never stop early.",
    )
    eval_every_steps: int | None = Field(
        None,
        ge=1,
        description="Validate every k steps; null = at the end of every epoch. Training always "
        "validates once at the end.",
    )
    # Not loss by default: on small validation sets the loss of a model that grows more
    # confident rises while its accuracy still improves, and selecting on it kept epoch-1
    # weights 15-20 points worse on held-out Rotten Tomatoes rows.
    metric_for_best: MetricName = Field(
        "accuracy",
        description="Validation metric that picks the best checkpoint (the one kept). For "
        "preference data accuracy is pairwise (chosen scored above rejected), for chat it is "
        "token accuracy, for DPO the share of pairs whose chosen reply has the higher implicit "
        "reward; macro_f1 applies to classification only.",
    )
    validation_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of the training rows held out for validation when no validation "
        "file is given; 0 = no validation. A file too small for the default share to hold out "
        "a row (of each label) trains on every row without validation; a share sent that "
        "holds out none is refused.",
    )
    bucket_by_length: bool = Field(
        True,
        description="Batch rows of similar length together (less padding, faster); the order "
        "of batches stays random.",
    )
    # TRL RewardTrainer semantics: loss = -logsigmoid(r_c - r_r - margin)
    # + center_rewards_coefficient * mean((r_c + r_r)^2).
    margin: float = Field(
        0.0,
        ge=-MAX_ABS_MARGIN,
        le=MAX_ABS_MARGIN,
        description="Preference data only: the chosen response must outscore the rejected one "
        "by this much (loss -logsigmoid(r_chosen - r_rejected - margin)). A row's own margin "
        "wins.",
    )
    center_rewards_coefficient: float | None = Field(
        None,
        ge=0.0,
        description="Preference data only: weight of a penalty on mean((r_chosen + "
        "r_rejected)^2) that keeps rewards centred on 0; null = off.",
    )
    # Held-out HH-RLHF pair accuracy at 1 epoch (README "Reward models"): LoRA on every linear
    # 0.654/0.647/0.625 without dropout, 0.645/0.623/0.636 with it (seeds 0/1/2); on query +
    # value 0.638/0.613 without, 0.632/0.600 with (seeds 0/1). Peak RSS fell by ~300 MiB.
    disable_dropout: bool = Field(
        True,
        description="Preference data only: train without the base's and the head's dropout "
        "(TRL's RewardTrainer default). The chosen and rejected texts would pass through "
        "different dropout masks, whose noise lands in the difference the loss reads. false "
        "= dropout as a classifier trains with.",
    )
    # Held-out HH-RLHF pair accuracy of the default 3-epoch job (core.training.averaging):
    # 0.656 / 0.660 / 0.636 at seeds 0 / 1 / 2 averaged, 0.632 / 0.658 / 0.628 best epoch.
    average_epochs: bool = Field(
        True,
        description="Preference data only: the reward model is the mean of the weights at "
        "the end of each epoch (stochastic weight averaging), not the weights of the epoch "
        "that validated best; its validation metrics are the mean's. Validation still runs "
        "every epoch, and early stopping still reads it. false = the best epoch's weights.",
    )
    split_shared_prefix: bool = Field(
        True,
        description="Preference data only: a row without a prompt whose chosen and rejected "
        "texts are one dialogue up to a turn boundary ('\\n\\nHuman:' / "
        "'\\n\\nAssistant:', as in HH-RLHF) is trained as that shared dialogue (the prompt) "
        "and the two texts that follow it (the responses). false = every text as given.",
    )
    # OpenAI's DPO hyperparameter names (method.dpo.hyperparameters.beta); TRL's defaults.
    beta: float = Field(
        0.1,
        gt=0.0,
        le=100.0,
        description="DPO only: how far the policy may move from the reference (the base with "
        "the adapter off); the implicit reward is beta x (policy - reference) log-probability "
        "of a reply. Lower lets the adapter move further.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="DPO only: the share of preference labels assumed wrong (conservative "
        "DPO); 0 = the labels are trusted.",
    )
    seed: int = Field(
        0, ge=0, le=2**63 - 1, description="Seeds initialisation, shuffling and dropout."
    )
    checkpoint_every_steps: int | None = Field(
        None,
        ge=1,
        description="Call the checkpoint callback every N steps (and always at epoch ends); "
        "null = epoch ends only.",
    )
    # torch.set_num_threads is process-wide, so the library never calls it; the worker
    # process should, once, at start-up.
    num_threads: int | None = Field(
        None, ge=1, le=1024, description="Advisory CPU thread budget for the caller."
    )

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise _FieldError("warmup_steps", "set warmup_ratio or warmup_steps, not both")
        return self

    # --- resolved values -------------------------------------------------------------------

    def resolved_learning_rate(self, method_type: str) -> float:
        if self.learning_rate == "auto":
            return DEFAULT_LEARNING_RATES.get(method_type, FALLBACK_LEARNING_RATE)
        return float(self.learning_rate)

    def resolved_max_seq_length(self, task: str) -> int:
        """``max_seq_length``, or the task's default when it is not set."""
        return self.max_seq_length or DEFAULT_MAX_SEQ_LENGTHS[task]

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

    def total_steps(self, train_rows: int) -> int:
        """Optimizer steps a run on ``train_rows`` rows takes: ``max_steps``, else ``n_epochs``
        passes (what the trainer plans, and what job creation checks against its limit)."""
        return self.max_steps or self.n_epochs * batches_per_epoch(train_rows, self.batch_size)

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
