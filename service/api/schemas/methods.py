"""Method and hyperparameter schemas, derived from core's config classes: never copied.

Core's pydantic configs (``core.methods.*.config``, ``core.training.config.TrainingConfig``)
define every setting once, with its description, default and range. This module turns them
into the API's request models (every field optional: absent or null means core's default,
which the schema shows as ``default``) and into the ``GET /v1/methods`` catalogue.
"""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    create_model,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError, to_jsonable_python

from core.methods import METHODS
from core.training.config import TrainingConfig, settings_unread_by
from service.datasets.rows import MESSAGE_KINDS, TASKS
from service.jobs.validate import LANGUAGE_MODEL_METHODS

# Core's research baseline (the architecture trained from random init) is not offered by the
# service: it needs far more data than a tenant uploads and is never the right choice.
API_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m != "scratch")

# Training settings the service decides itself, and why; a request that sets one is refused.
SERVER_SETTINGS: dict[str, str] = {
    "seed": "set the job's top-level seed instead",
    "checkpoint_every_steps": "the server setting LORAPLEX_CHECKPOINT_EVERY_STEPS decides it",
    "num_threads": "the worker's thread budget (LORAPLEX_TRAIN_THREADS) decides it",
}

# The settings a job may not set, each with the reason it is refused. (Settings only one task
# reads, such as DPO's beta, are refused on jobs of other tasks when the job is created.)
_REFUSED_SETTINGS: dict[str, tuple[str, str]] = {
    name: ("server_setting", f"set by the server: {why}") for name, why in SERVER_SETTINGS.items()
}


def _error_at_field(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # Union members and tuple items add their own steps to an error's location
    # ("learning_rate.float", "adam_betas.1"); a client needs the field's name, as core reports.
    try:
        return handler(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PydanticCustomError(first["type"], first["msg"]) from None


def _holds_bool(value: Any) -> bool:
    return isinstance(value, bool) or (
        isinstance(value, list | tuple) and any(_holds_bool(v) for v in value)
    )


def _refuse_bool(value: Any) -> Any:
    if _holds_bool(value):
        raise PydanticCustomError("number_type", "Input should be a number, not a boolean")
    return value


# Pydantic's lax mode reads true as 1 and false as 0, in lists too (batch_size: true trained
# with 1); JSON's true is no number a client means. Numeric strings stay accepted. Placed
# outside a field's type, so its bounds stay on the number (and in the JSON Schema).
NotBool = BeforeValidator(_refuse_bool)


def _mentions(tp: Any, kinds: tuple[type, ...]) -> bool:
    return tp in kinds or any(_mentions(arg, kinds) for arg in get_args(tp))


def takes_numbers_not_bools(tp: Any) -> bool:
    """Whether a field of type ``tp`` holds numbers, and no booleans: :data:`NotBool` fits."""
    return _mentions(tp, (int, float)) and not _mentions(tp, (bool,))


def _refuse_setting(error_type: str, message: str) -> WrapValidator:
    def refuse(_value: Any, _handler: ValidatorFunctionWrapHandler) -> Any:
        raise PydanticCustomError(error_type, message)

    return WrapValidator(refuse)


def core_default(info: FieldInfo) -> Any:
    """The JSON value core uses when the field is absent."""
    return to_jsonable_python(info.get_default(call_default_factory=True))


def optional_fields(
    model: type[BaseModel], *, exclude: set[str] | frozenset[str] = frozenset()
) -> dict[str, Any]:
    """``create_model`` field definitions mirroring ``model``'s: same types, ranges and
    descriptions, but optional (None = core's default, which the schema shows as default)."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if name in exclude:
            continue
        not_bool = [NotBool] if takes_numbers_not_bools(info.annotation) else []
        annotation = Annotated[
            info.annotation | None, *info.metadata, WrapValidator(_error_at_field), *not_bool
        ]
        fields[name] = (
            annotation,
            Field(
                None,
                description=info.description,
                json_schema_extra={"default": core_default(info)},
            ),
        )
    return fields


def _request_config(model: type[BaseModel]) -> ConfigDict:
    """The config of a request model mirroring ``model``: unknown keys are 422s naming them,
    and numbers are finite where core's are (its ``allow_inf_nan`` is model-wide, so
    :func:`optional_fields` cannot copy it with a field's range)."""
    return ConfigDict(extra="forbid", allow_inf_nan=model.model_config.get("allow_inf_nan", True))


def optional_model(name: str, model: type[BaseModel], doc: str, **kwargs: Any) -> type[BaseModel]:
    """A request model with ``model``'s fields, all optional (see :func:`_request_config`)."""
    return create_model(
        name,
        __config__=_request_config(model),
        __doc__=doc,
        **optional_fields(model, **kwargs),
    )


def config_doc(cls: type[BaseModel]) -> str:
    return inspect.cleandoc(cls.__doc__ or "")


def method_title(method_type: str) -> str:
    """``prompt_tuning`` → ``PromptTuning``."""
    return "".join(part.title() for part in method_type.split("_"))


# Per-method parameter blocks (``method.lora``, ``method.adapter``, ...).
METHOD_PARAMS: dict[str, type[BaseModel]] = {
    m: optional_model(
        f"{method_title(m)}Params",
        METHODS[m],
        f"Parameters of method '{m}'; absent fields take the defaults shown.\n\n"
        + config_doc(METHODS[m]),
    )
    for m in API_METHODS
}

# The refused settings stay out of the documented schema but answer a clear 422.
_REFUSED_FIELDS: dict[str, Any] = {
    name: (
        SkipJsonSchema[Annotated[Any, _refuse_setting(error_type, message)]],
        Field(None, exclude=True),
    )
    for name, (error_type, message) in _REFUSED_SETTINGS.items()
}

Hyperparameters: type[BaseModel] = create_model(
    "Hyperparameters",
    __config__=_request_config(TrainingConfig),
    __doc__="Training settings. Absent (or null) fields take the defaults shown; "
    "'learning_rate': 'auto' is the method's default (see GET /v1/methods).",
    **optional_fields(TrainingConfig, exclude=set(_REFUSED_SETTINGS)),
    **_REFUSED_FIELDS,
)


# --- GET /v1/methods -------------------------------------------------------------------------


def _schema(
    model: type[BaseModel], exclude: set[str] | frozenset[str] = frozenset()
) -> dict[str, Any]:
    """``model``'s JSON Schema with every property's default (pydantic leaves out the ones
    made by a default factory, such as LoRA's target_modules)."""
    schema = model.model_json_schema()
    schema["properties"] = {
        name: {**prop, "default": core_default(model.model_fields[name])}
        for name, prop in schema["properties"].items()
        if name not in exclude
    }
    return schema


def _defaults(
    model: type[BaseModel], exclude: set[str] | frozenset[str] = frozenset()
) -> dict[str, Any]:
    return {
        name: core_default(info) for name, info in model.model_fields.items() if name not in exclude
    }


class HyperparameterCatalog(BaseModel):
    """The training settings (method.hyperparameters) every method shares."""

    json_schema: dict[str, Any] = Field(
        alias="schema",
        description="JSON Schema of method.hyperparameters: each property's type, range, "
        "default and description.",
    )
    defaults: dict[str, Any] = Field(
        description="What each setting is when a job leaves it out ('learning_rate': 'auto' "
        "resolves per method; see each method's tasks)."
    )

    model_config = ConfigDict(populate_by_name=True)


class TaskDefaults(BaseModel):
    """What a method trains with on one kind of dataset when the job sets nothing."""

    hyperparameters: dict[str, Any] = Field(
        description="The training settings a job of this method on this kind of dataset "
        "runs with when it sets none: learning_rate resolved from 'auto' to a number, "
        "max_seq_length from null to the task's length; "
        "settings the task does not read are left out."
    )


class MethodInfo(BaseModel):
    """One adaptation method: what it is, its parameters and its defaults."""

    object: Literal["method"] = Field("method", description='Always "method".')
    type: str = Field(description="The value for method.type.")
    description: str = Field(description="What the method trains.")
    json_schema: dict[str, Any] = Field(
        alias="schema",
        description="JSON Schema of the method's parameter block (method.<type>): each "
        "property's type, range, default and description.",
    )
    defaults: dict[str, Any] = Field(description="The parameters a job gets when it sets none.")
    tasks: dict[str, TaskDefaults] = Field(
        description="Per dataset kind (classification, preference; chat and dpo for the "
        "methods that train a decoder base): the training defaults."
    )

    model_config = ConfigDict(populate_by_name=True)


class MethodCatalog(BaseModel):
    """The methods a job may use and the training settings they share."""

    object: Literal["list"] = Field("list", description='Always "list".')
    data: list[MethodInfo] = Field(description="Every method a job may use, in the API's order.")
    hyperparameters: HyperparameterCatalog = Field(
        description="The training settings every method shares (method.hyperparameters)."
    )


def _task_defaults(method_type: str, task: str) -> TaskDefaults:
    skip = set(_REFUSED_SETTINGS) | settings_unread_by(task)
    values = _defaults(TrainingConfig, skip)
    values["learning_rate"] = TrainingConfig().resolved_learning_rate(method_type)
    values["max_seq_length"] = TrainingConfig().resolved_max_seq_length(task)
    return TaskDefaults(hyperparameters=values)


@functools.cache
def method_catalog() -> MethodCatalog:
    """Everything ``GET /v1/methods`` answers, computed from core once: the configs do not
    change while the process runs, and building the schemas takes ~10 ms, which the async
    route would spend on the event loop every call."""
    return MethodCatalog(
        data=[
            MethodInfo(
                type=m,
                description=config_doc(METHODS[m]),
                json_schema=_schema(METHODS[m]),
                defaults=_defaults(METHODS[m]),
                tasks={
                    kind: _task_defaults(m, task)
                    for kind, task in TASKS.items()
                    # chat and dpo train adapters generation serves: LoRA only
                    if kind not in MESSAGE_KINDS or m in LANGUAGE_MODEL_METHODS
                },
            )
            for m in API_METHODS
        ],
        hyperparameters=HyperparameterCatalog(
            json_schema=_schema(TrainingConfig, set(_REFUSED_SETTINGS)),
            defaults=_defaults(TrainingConfig, set(_REFUSED_SETTINGS)),
        ),
    )
