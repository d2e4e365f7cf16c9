"""Fine-tuning job bodies, OpenAI-shaped.

The method blocks and hyperparameters are derived from core's configs
(``service.api.schemas.methods``): types, ranges, defaults and descriptions come from there.
Cross-field rules (warm-up given twice, prompt tuning's init text) stay core's business: see
``service.jobs.validate``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from service.api.schemas.common import NAME_PATTERN
from service.api.schemas.methods import API_METHODS, METHOD_PARAMS, Hyperparameters, NotBool
from service.db.models import Job
from service.db.types import to_unix
from service.jobs.create import JobRequest
from service.jobs.openai_compat import (
    HYPERPARAMETERS_PATH,
    OPENAI_METHOD_TYPES,
    SentPath,
    learning_rate_multiplier,
    openai_job_hyperparameters,
    translate_job_request,
)
from service.names import NoControlCharacters

MethodType = StrEnum(  # type: ignore[misc]
    "MethodType",
    {m.upper(): m for m in (*API_METHODS, *OPENAI_METHOD_TYPES)},
    module=__name__,
)
MethodType.__doc__ = (
    "A loraplex method, or OpenAI's supervised (LoRA: chat SFT on a chat dataset, a classifier "
    "on a classification dataset) or dpo (LoRA: DPO on a dpo dataset, a reward model on a "
    "preference dataset). See GET /v1/methods."
)


class OpenAIHyperparameters(BaseModel):
    """OpenAI's hyperparameter block; 'auto' (or absent) means loraplex's default. Any of
    loraplex's hyperparameters (method.hyperparameters) may be given here too."""

    model_config = ConfigDict(extra="allow")

    n_epochs: Annotated[int | Literal["auto"] | None, NotBool] = Field(
        None, description="As n_epochs."
    )
    batch_size: Annotated[int | Literal["auto"] | None, NotBool] = Field(
        None, description="As batch_size."
    )
    # The bound sits on the float alone: on the whole union pydantic would apply it to "auto"
    # too and fail with a TypeError (a 500) instead of validating.
    learning_rate_multiplier: Annotated[
        Annotated[float, Field(gt=0)] | Literal["auto"] | None, NotBool
    ] = Field(None, description="Scales the default learning rate of LoRA.")


class OpenAIDpoHyperparameters(OpenAIHyperparameters):
    """OpenAI's DPO hyperparameter block (see OpenAIHyperparameters), with beta."""

    beta: Annotated[Annotated[float, Field(gt=0)] | Literal["auto"] | None, NotBool] = Field(
        None,
        description="As beta: DPO's strength (on a dpo dataset; 'auto' = 0.1). A reward model "
        "(a preference dataset) has no beta: a number is refused there (422).",
    )


class OpenAISupervised(BaseModel):
    """OpenAI's `method.supervised` block."""

    model_config = ConfigDict(extra="forbid")
    hyperparameters: OpenAIHyperparameters | None = Field(
        None, description="Training settings, OpenAI's and loraplex's."
    )


class OpenAIDpo(BaseModel):
    """OpenAI's `method.dpo` block."""

    model_config = ConfigDict(extra="forbid")
    hyperparameters: OpenAIDpoHyperparameters | None = Field(
        None, description="Training settings, OpenAI's and loraplex's."
    )


class _MethodSpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: MethodType = Field(description="Which method trains the adapter.")
    # OpenAI's blocks are mapped onto LoRA before this model validates (see
    # service.jobs.openai_compat); declared here so that the schema documents them.
    supervised: OpenAISupervised | None = Field(
        None, description="With type 'supervised': OpenAI's hyperparameters."
    )
    dpo: OpenAIDpo | None = Field(None, description="With type 'dpo': OpenAI's hyperparameters.")
    hyperparameters: Hyperparameters = Field(  # type: ignore[valid-type]
        default_factory=Hyperparameters, description="Training settings shared by every method."
    )

    @model_validator(mode="after")
    def _params_match_type(self) -> _MethodSpecBase:
        for other in MethodType:
            if other is not self.type and getattr(self, other.value) is not None:
                raise ValueError(
                    f"parameters given under '{other.value}' but method.type is '{self.type.value}'"
                )
        return self

    def params(self) -> dict[str, Any]:
        block = getattr(self, self.type.value)
        return block.model_dump(mode="json", exclude_none=True) if block is not None else {}

    def stored_method(self) -> dict[str, Any]:
        """What the ``jobs.method`` column keeps: the type and its parameters."""
        return {"type": self.type.value, self.type.value: self.params()}

    def stored_hyperparameters(self) -> dict[str, Any]:
        return self.hyperparameters.model_dump(mode="json", exclude_none=True)


MethodSpec = create_model(
    "MethodSpec",
    __base__=_MethodSpecBase,
    __doc__='`{"type": "lora", "lora": {...}, "hyperparameters": {...}}`: the method, its '
    "parameters under its own name, and the training settings.",
    **{
        m: (model | None, Field(None, description=f"Parameters of '{m}' (with type '{m}')."))
        for m, model in METHOD_PARAMS.items()
    },
)


class JobCreate(BaseModel):
    """A fine-tuning job: which dataset, which method, which settings (OpenAI-shaped)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "training_file": "file-3f2a9c0d1e4b5a6978c1d2e3",
                    "adapter_name": "sentiment-v1",
                    "seed": 42,
                    "method": {
                        "type": "lora",
                        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
                        "hyperparameters": {"n_epochs": 2, "warmup_steps": 20},
                    },
                },
                {
                    "training_file": "file-3f2a9c0d1e4b5a6978c1d2e3",
                    "method": {
                        "type": "supervised",
                        "supervised": {"hyperparameters": {"n_epochs": 3}},
                    },
                },
            ]
        },
    )

    # No id or name has a control character (service.names).
    training_file: Annotated[str, NoControlCharacters] = Field(
        min_length=1, max_length=64, description="Id of the training dataset (file-...)."
    )
    validation_file: Annotated[str | None, NoControlCharacters] = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="Id of a validation dataset of the same kind; null = hold out "
        "validation_fraction of the training rows.",
    )
    adapter_name: str | None = Field(
        default=None,
        max_length=64,
        pattern=NAME_PATTERN,
        description="Name to save the trained adapter under; must be free in the tenant. "
        "null = generated from the method type, suffix and a random part.",
    )
    suffix: str | None = Field(
        default=None,
        max_length=32,
        pattern=NAME_PATTERN,
        description="Put in the generated adapter name (when adapter_name is absent).",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=2**32 - 1,
        description="Seed of the run: the same seed and data give the same adapter. null = "
        "a random seed, reported on the job.",
    )
    model: Annotated[str | None, NoControlCharacters] = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="The base model to train on (GET /v1/models); null = the first "
        "configured base of the kind the training file needs: a decoder for chat and dpo "
        "datasets, an encoder for classification and preference datasets.",
    )
    reference_adapter: str | None = Field(
        default=None,
        max_length=64,
        pattern=NAME_PATTERN,
        description="DPO only: the name of one of your chat (SFT) adapters on the same base, "
        "with the same method type, that is DPO's reference policy and the policy's starting "
        "weights (SFT, then DPO); the job trains its method parameters (r, targets, ...), "
        "which the request may leave out. null = the base with the adapter off.",
    )
    # OpenAI's method types (supervised, dpo) and its deprecated top-level hyperparameters,
    # integrations and metadata are accepted too: see service.jobs.openai_compat.
    method: MethodSpec = Field(
        default_factory=lambda: MethodSpec(type=MethodType.LORA),
        description="The method and its settings. Default: LoRA with default parameters.",
    )
    # OpenAI's method type (supervised, dpo) when the request used one: it fixes the kind of
    # training data the job accepts. Set by the validator below, never by the client.
    _openai_method: str | None = PrivateAttr(default=None)
    # Where the client sent each hyperparameter the validator moved (service.jobs.create names
    # them so in its errors).
    _sent_paths: dict[str, SentPath] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _from_openai(cls, data: Any, handler: ModelWrapValidatorHandler[JobCreate]) -> JobCreate:
        # The OpenAI SDK's body (method types, deprecated top-level hyperparameters) mapped
        # onto ours first; see service.jobs.openai_compat.
        translated = translate_job_request(data)
        try:
            job = handler(translated.body)
        except ValidationError as e:
            if not translated.sent_paths:
                raise
            raise _at_sent_paths(e, translated.sent_paths) from None
        job._openai_method = translated.openai_method
        job._sent_paths = translated.sent_paths
        return job

    @property
    def openai_method(self) -> str | None:
        return self._openai_method

    def job_request(self) -> JobRequest:
        """This body as ``service.jobs.create`` takes it (no HTTP model crosses into it)."""
        return JobRequest(
            training_file=self.training_file,
            method=self.method.stored_method(),
            hyperparameters=self.method.stored_hyperparameters(),
            validation_file=self.validation_file,
            adapter_name=self.adapter_name,
            suffix=self.suffix,
            seed=self.seed,
            model=self.model,
            openai_method=self.openai_method,
            reference_adapter=self.reference_adapter,
            sent_paths=self._sent_paths,
        )


def _at_sent_paths(error: ValidationError, sent_paths: dict[str, SentPath]) -> ValidationError:
    """``error`` with each hyperparameter's location where the client sent it (an OpenAI
    method block, the deprecated top-level block), not the ``method.hyperparameters`` it
    was moved to."""
    details: list[InitErrorDetails] = []
    for err in error.errors(include_url=False):
        loc = err["loc"]
        if loc[:2] == HYPERPARAMETERS_PATH and len(loc) > 2 and loc[2] in sent_paths:
            loc = (*sent_paths[str(loc[2])], *loc[3:])
        details.append(
            {
                "type": PydanticCustomError(err["type"], err["msg"]),
                "loc": loc,
                "input": err["input"],
            }
        )
    return ValidationError.from_exception_data(error.title, details)


# --- responses -------------------------------------------------------------------------------


class JobError(BaseModel):
    """Why a job failed."""

    code: str | None = Field(None, description="Machine-readable reason, e.g. `invalid_dataset`.")
    message: str = Field(description="What went wrong, for people.")
    param: str | None = Field(
        None, description="The request field at fault (e.g. `training_file`), if one is."
    )


class JobProgress(BaseModel):
    step: int = Field(
        description="Optimizer steps done; the job's last progress event names the same step."
    )
    total_steps: int | None = Field(
        description="Steps the run will take (epochs x steps per epoch, or max_steps); null "
        "until a worker has set the job up."
    )
    epoch: float | None = Field(
        description="Epochs completed, as a float (Hugging Face Trainer's convention): 0.5 is "
        "half-way through the first epoch, 1.0 its end; a finished 3-epoch job says 3.0. "
        "Null until the first step."
    )


# The OpenAI job object's hyperparameters, filled in from what the run resolved.
_OPENAI_RESOLVED = ("n_epochs", "batch_size", "learning_rate")


class JobObject(BaseModel):
    """A fine-tuning job, OpenAI's job object plus what loraplex knows about the run."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "ftjob-3b9e1f0c7a2d4e6f8a1b2c3d",
                    "object": "fine_tuning.job",
                    "organization_id": "tenant-5d2c8e1f9a3b7c4d",
                    "model": "sentence-transformers/all-MiniLM-L6-v2",
                    "created_at": 1764950400,
                    "started_at": 1764950402,
                    "finished_at": 1764950461,
                    "status": "succeeded",
                    "training_file": "file-6f1c0e9a2b4d8c3e5a7f9b1d",
                    "validation_file": None,
                    "adapter_name": "sentiment",
                    "method": {
                        "type": "lora",
                        "lora": {"r": 8},
                        "hyperparameters": {"n_epochs": 3, "learning_rate": 2e-3},
                    },
                    "hyperparameters": {
                        "n_epochs": 3,
                        "learning_rate": 2e-3,
                        "batch_size": 16,
                        "learning_rate_multiplier": 2.0,
                    },
                    "resolved_hyperparameters": {
                        "n_epochs": 3,
                        "batch_size": 16,
                        "learning_rate": 2e-3,
                        "warmup_steps": 6,
                        "lr_scheduler": "linear",
                        "max_seq_length": 128,
                        "total_steps": 69,
                        "steps_per_epoch": 23,
                        "validation": "held_out",
                        "validation_fraction": 0.1,
                        "held_out_examples": 40,
                        "train_examples": 360,
                        "val_examples": 40,
                    },
                    "seed": 7,
                    "fine_tuned_adapter": "sentiment",
                    "fine_tuned_model": "sentiment",
                    "trained_tokens": 61290,
                    "result_files": [],
                    "error": None,
                    "progress": {"step": 69, "total_steps": 69, "epoch": 3.0},
                    "metrics": {
                        "val_accuracy": 0.85,
                        "val_loss": 0.41,
                        "train_loss": 0.37,
                        "steps": 69,
                        "epochs": 3.0,
                        "trained_tokens": 61290,
                    },
                    "estimated_finish": None,
                }
            ]
        }
    )

    id: str = Field(description="The job's id (ftjob-...).")
    object: Literal["fine_tuning.job"] = Field(
        "fine_tuning.job", description='Always "fine_tuning.job".'
    )
    # OpenAI's owner field: the tenant is the organization here.
    organization_id: str = Field(description="The tenant that owns the job (OpenAI's name).")
    model: str = Field(description="The base model the adapter is trained on.")
    created_at: int = Field(description="Unix seconds when the job was created.")
    started_at: int | None = Field(description="Unix seconds when a worker first started it.")
    finished_at: int | None = Field(
        description="Unix seconds when it succeeded, failed or was cancelled."
    )
    status: str = Field(
        description="validating_files, queued, running, cancel_requested, succeeded, failed "
        "or cancelled."
    )
    training_file: str = Field(description="The training dataset's id.")
    validation_file: str | None = Field(
        description="The validation dataset's id; null when validation rows are held out of "
        "the training file (see resolved_hyperparameters.validation)."
    )
    adapter_name: str = Field(description="The name the trained adapter is saved under.")
    method: dict[str, Any] = Field(
        description="The method as requested: type, its parameters, and the hyperparameters "
        "exactly as sent. A job created with OpenAI's type supervised or dpo echoes it in "
        'OpenAI\'s shape, {"type": "dpo", "dpo": {"hyperparameters": {n_epochs, batch_size, '
        "learning_rate_multiplier, beta (dpo only)}}}, each the value the run uses once a "
        'worker has set the job up, before that as sent or "auto"; beside it, "lora" holds '
        'the LoRA parameters it trains and "hyperparameters" loraplex\'s as sent. A DPO job '
        "with a reference_adapter holds that adapter's parameters (which it trains), "
        "reference_adapter, the name sent, and reference_adapter_id, the adapter version it "
        "pinned (jobs created before loraplex kept the name hold that id as reference_adapter)."
    )
    hyperparameters: dict[str, Any] = Field(
        description="The hyperparameters sent; once a worker has set the job up, n_epochs, "
        "batch_size and learning_rate hold the values used (so OpenAI clients read numbers, "
        'not null or "auto"). Where a learning rate is known (sent, or once set up), '
        "learning_rate_multiplier is OpenAI's view of it: the learning rate over the method's "
        "default (as method.supervised.hyperparameters shows it). Every resolved setting is "
        "in resolved_hyperparameters."
    )
    resolved_hyperparameters: dict[str, Any] | None = Field(
        description='Every training setting as the run uses it, defaults and "auto" '
        "resolved (learning_rate, batch_size, n_epochs, warmup_steps, eval_batch_size, "
        "max_seq_length after the base model's cap, ...), plus the plan: total_steps, "
        'steps_per_epoch, train_examples, val_examples, and validation: "held_out" '
        "(held_out_examples training rows, a validation_fraction share, were held out), "
        '"validation_set" or "none". Null until a worker has set the job up.'
    )
    seed: int = Field(
        description="The seed of the run: the same seed and data give the same adapter."
    )
    fine_tuned_adapter: str | None = Field(
        description="The trained adapter's name once the job succeeded."
    )
    fine_tuned_model: str | None = Field(
        description="OpenAI's name for fine_tuned_adapter (the same value)."
    )
    trained_tokens: int | None = Field(
        description="Tokens trained on so far (padding excluded), counted every step: an "
        "example seen in three epochs counts three times, as OpenAI bills. Null until the "
        "first progress report."
    )
    result_files: list[str] = Field(
        default_factory=list,
        description="Always empty: OpenAI's metrics files; loraplex reports metrics on the job "
        "and in its events.",
    )
    error: JobError | None = Field(description="Why the job failed; null otherwise.")
    progress: JobProgress = Field(description="Where the run is; it agrees with the last event.")
    metrics: dict[str, Any] = Field(
        description="Latest training metrics while running; the final metrics (best "
        "validation, train_loss, steps, epochs, trained_tokens, ...) once succeeded."
    )
    estimated_finish: int | None = Field(
        description="Unix seconds when the run is expected to finish, while it runs."
    )

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
            method=_echoed_method(job),
            hyperparameters=_openai_hyperparameters(job),
            resolved_hyperparameters=job.resolved_hyperparameters,
            seed=job.seed,
            fine_tuned_adapter=job.fine_tuned_adapter,
            fine_tuned_model=job.fine_tuned_adapter,
            trained_tokens=job.trained_tokens,
            error=JobError(**job.error) if job.error else None,
            progress=JobProgress(step=job.step, total_steps=job.total_steps, epoch=job.epoch),
            metrics=job.metrics or {},
            estimated_finish=to_unix(job.estimated_finish),
        )


def _echoed_method(job: Job) -> dict[str, Any]:
    """The job object's ``method`` (see its description). The stored block is what training
    reads: OpenAI's types mapped onto LoRA, the reference adapter pinned by id; the columns
    beside it keep what the client named (null on jobs from before migration 0008, which
    echo the stored block as they always did)."""
    method = {**job.method, "hyperparameters": job.hyperparameters}
    if job.reference_adapter_name is not None:
        method["reference_adapter_id"] = method["reference_adapter"]
        method["reference_adapter"] = job.reference_adapter_name
    openai_type = job.openai_method
    if openai_type is None:
        return method
    hyperparameters = openai_job_hyperparameters(
        openai_type, job.hyperparameters, job.resolved_hyperparameters
    )
    # OpenAI's fields first; loraplex's blocks ("lora", "hyperparameters", the reference
    # adapter) stay beside them, where OpenAI's SDK keeps unknown fields as extras.
    rest = {k: v for k, v in method.items() if k != "type"}
    return {"type": openai_type, openai_type: {"hyperparameters": hyperparameters}, **rest}


def _openai_hyperparameters(job: Job) -> dict[str, Any]:
    """The job object's top-level ``hyperparameters`` (see its description)."""
    resolved = job.resolved_hyperparameters or {}
    out = {**job.hyperparameters, **{k: resolved[k] for k in _OPENAI_RESOLVED if k in resolved}}
    rate = out.get("learning_rate")
    if rate is not None:  # over the stored method type's default (supervised and dpo: lora)
        out["learning_rate_multiplier"] = learning_rate_multiplier(rate, job.method["type"])
    return out
