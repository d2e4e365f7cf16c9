"""Validation of a job's ``method`` block against the core library.

The core library is the authority on what a method's parameters and the training
hyperparameters mean: :func:`validate_method` asks ``core.methods.parse_method_config`` and
``core.training.config.parse_training_config`` and turns their :class:`core.errors.ConfigError` into
:class:`MethodConfigError` with ``param`` relative to ``method`` (``"lora.r"``,
``"hyperparameters.learning_rate"``); the route answers a 422 whose ``param`` is
``method.<param>``. The core modules it imports are torch-free configs. Where the job's task
and base are known, it also refuses what only the worker would find wrong: a method that
trains an adapter nothing serves, a layer or a prompt length past the base's, a metric the task
has not.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.methods import parse_method_config
from core.targets import DECODER_METHODS, BaseKind
from core.training.config import parse_training_config
from service.bases import BaseSpec
from service.datasets.rows import MESSAGE_KINDS, TASKS
from service.errors import ServiceError

# Method blocks are small; anything bigger is a mistake or abuse.
MAX_METHOD_JSON_BYTES = 64 * 1024
# A decoder's language-model tasks (chat SFT, DPO), whose rows are OpenAI's message lists.
LANGUAGE_MODEL_TASKS = frozenset(TASKS[kind] for kind in MESSAGE_KINDS)
# The methods that train them: generation serves LoRA adapters only
# (``GenerationServer.lora_weights``), so a full or prompt-tuned chat adapter trained to the
# end and then answered every request with model_not_generative. A decoder's classifiers and
# reward models take every one of DECODER_METHODS: its scoring routes run them all.
LANGUAGE_MODEL_METHODS: tuple[str, ...] = ("lora",)


class MethodConfigError(ServiceError):
    default_code = "invalid_method"


def param_from_loc(prefix: str, loc: Sequence[str | int]) -> str:
    """``("hyperparameters", ("learning_rate",))`` → ``hyperparameters.learning_rate``."""
    return ".".join([prefix, *(str(p) for p in loc)]) if loc else prefix


def _clean(message: str) -> str:
    # pydantic prefixes custom validator messages with "Value error, ": noise to a client.
    return message.removeprefix("Value error, ")


@dataclass(frozen=True)
class BaseLimits:
    """What a base allows a method: its layers (LoRA's ``layers`` index them) and its window
    (prompt tuning's virtual tokens must leave room in it), as the loaded base has them."""

    num_layers: int
    max_length: int


@functools.cache
def _base_limits(kind: BaseKind, path: Path | None) -> BaseLimits | None:
    # Read from config.json or the GGUF header alone (no weights; torch is imported lazily, as
    # the service's other paths to core's bases do); cached, as the files do not change while
    # the service runs.
    if kind == "decoder":
        from core.decoder.base import DecoderBaseError, decoder_dims

        try:
            return BaseLimits(*decoder_dims(path))
        except (DecoderBaseError, OSError):
            return None  # start-up's preflight refuses such a file; the worker reports it too
    from core.base import BaseModelError, check_model_dir, default_model_dir, window_of
    from core.encoder import EncoderConfig

    try:
        model_dir = path if path is not None else default_model_dir()
        config = EncoderConfig.from_hf_dict(check_model_dir(model_dir))
    except BaseModelError:
        return None
    # The window load_base_model gives the base (a sentence-transformers folder's
    # max_seq_length, MiniLM's 256, below its 512 positions).
    return BaseLimits(config.num_hidden_layers, window_of(model_dir, config))


def base_limits(base: BaseSpec) -> BaseLimits | None:
    """The layers and window of ``base`` (None: unknown here; the worker checks them)."""
    return _base_limits(base.kind, base.path)


def _task_methods(base_kind: BaseKind, task: str | None) -> tuple[str, ...] | None:
    """The methods that train ``task`` on a base of ``base_kind`` (None: every method)."""
    if task in LANGUAGE_MODEL_TASKS:
        return LANGUAGE_MODEL_METHODS
    return DECODER_METHODS if base_kind == "decoder" else None


def validate_method(
    method: dict[str, Any],
    limits: BaseLimits | None = None,
    base_kind: BaseKind = "encoder",
    task: str | None = None,
) -> None:
    """Raise :class:`MethodConfigError` if ``method`` is not a trainable configuration.

    ``method`` is the request's method block, already shape-checked by
    ``service.api.schemas.jobs.MethodSpec``: ``{"type": ..., "<type>": {params},
    "hyperparameters": {...}}`` (unset hyperparameters omitted). ``limits``: the base's layer
    count and window, against which layer indices (LoRA's ``layers``) and prompt tuning's
    virtual tokens are checked. ``base_kind``: the kind of base the job trains, whose layer
    names the method's targets must use (``query`` on an encoder, ``q_proj`` on a decoder) and
    which only some methods train. ``task``: what the training file trains (None: unknown),
    which only some methods train and which has only some metrics.
    """
    size = len(json.dumps(method, default=str))
    if size > MAX_METHOD_JSON_BYTES:
        raise MethodConfigError(
            f"method block is {size} bytes; at most {MAX_METHOD_JSON_BYTES} are allowed"
        )
    method_type = method.get("type")
    if not isinstance(method_type, str):
        raise MethodConfigError("method.type: a method type is required", param="type")
    methods = _task_methods(base_kind, task)
    if methods is not None and method_type not in methods:
        what = (
            f"a {task} adapter here: generation serves LoRA adapters only"
            if methods is LANGUAGE_MODEL_METHODS
            else "a decoder base"
        )
        raise MethodConfigError(
            f"method.type: '{method_type}' does not train {what}; use one of {list(methods)}",
            param="type",
        )
    try:
        config = parse_method_config(method_type, dict(method.get(method_type) or {}), base_kind)
    except ConfigError as exc:
        # core names its own "type" field for an unknown method; anything else is a parameter.
        param = "type" if exc.field == "type" else param_from_loc(method_type, [exc.field])
        raise MethodConfigError(f"method.{param}: {_clean(exc.message)}", param=param) from None
    layers = getattr(config, "layers", None)
    if layers == []:
        # Not "no layers to skip": LoRA on no layer trained the head alone, silently.
        param = param_from_loc(method_type, ["layers"])
        raise MethodConfigError(
            f"method.{param}: an empty list adapts no layer; name layers by index, or leave "
            "layers out (null) to adapt every one",
            param=param,
        )
    if limits is not None:
        _check_limits(method_type, layers, getattr(config, "n_virtual_tokens", None), limits)
    try:
        training = parse_training_config(dict(method.get("hyperparameters") or {}))
    except ConfigError as exc:
        # "training" is core's name for the whole block (e.g. a non-mapping value).
        loc = [] if exc.field == "training" else [exc.field]
        param = param_from_loc("hyperparameters", loc)
        raise MethodConfigError(f"method.{param}: {_clean(exc.message)}", param=param) from None
    if task not in (None, "classification") and training.metric_for_best == "macro_f1":
        param = "hyperparameters.metric_for_best"
        raise MethodConfigError(
            f"method.{param}: macro_f1 is a classification metric; this job trains {task} "
            "(use accuracy or loss)",
            param=param,
        )


def _check_limits(
    method_type: str, layers: list[int] | None, virtual: int | None, limits: BaseLimits
) -> None:
    """Refuse layer indices past the base's layers, and virtual tokens that fill its window
    (as core's LoraModel and PromptTuningModel would, once a worker has loaded the base)."""
    outside = sorted({i for i in layers or () if i >= limits.num_layers})
    if outside:
        param = param_from_loc(method_type, ["layers"])
        raise MethodConfigError(
            f"method.{param}: {outside} out of range; the base model has "
            f"{limits.num_layers} layers (0 to {limits.num_layers - 1})",
            param=param,
        )
    if virtual is not None and virtual >= limits.max_length:
        param = param_from_loc(method_type, ["n_virtual_tokens"])
        raise MethodConfigError(
            f"method.{param}: must be below the base model's window of {limits.max_length} "
            "tokens (the virtual tokens and the text share it)",
            param=param,
        )
