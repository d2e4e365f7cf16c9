"""Validation of a job's ``method`` block against the core library.

The core library is the authority on what a method's parameters and the training
hyperparameters mean: :func:`validate_method` asks ``core.methods.parse_method_config`` and
``core.training.parse_training_config`` and turns their :class:`core.errors.ConfigError` into
:class:`MethodConfigError` with ``param`` relative to ``method`` (``"lora.r"``,
``"hyperparameters.learning_rate"``); the route answers a 422 whose ``param`` is
``method.<param>``. The core modules it imports are torch-free configs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.methods import parse_method_config
from core.targets import DECODER_METHODS, BaseKind
from core.training.config import parse_training_config
from service.config import Settings
from service.errors import ServiceError

# Method blocks are small; anything bigger is a mistake or abuse.
MAX_METHOD_JSON_BYTES = 64 * 1024


class MethodConfigError(ServiceError):
    default_code = "invalid_method"


def param_from_loc(prefix: str, loc: Sequence[str | int]) -> str:
    """``("hyperparameters", ("learning_rate",))`` → ``hyperparameters.learning_rate``."""
    return ".".join([prefix, *(str(p) for p in loc)]) if loc else prefix


def _clean(message: str) -> str:
    # pydantic prefixes custom validator messages with "Value error, ": noise to a client.
    return message.removeprefix("Value error, ")


@functools.cache
def _layer_count(model_dir: Path | None) -> int | None:
    # Reads config.json alone (no weights; torch is imported lazily, as the service's other
    # paths to core.base do); cached, as the folder does not change while the service runs.
    from core.base import BaseModelError, check_model_dir, default_model_dir

    try:
        config = check_model_dir(model_dir if model_dir is not None else default_model_dir())
    except BaseModelError:
        return None  # start-up's preflight refuses such a folder; the worker reports it too
    count = config.get("num_hidden_layers")
    return count if isinstance(count, int) else None


def base_layer_count(settings: Settings) -> int | None:
    """How many encoder layers the base model jobs train on has (None: unknown here)."""
    return _layer_count(settings.base_model_path)


def validate_method(
    method: dict[str, Any], num_layers: int | None = None, base_kind: BaseKind = "encoder"
) -> None:
    """Raise :class:`MethodConfigError` if ``method`` is not a trainable configuration.

    ``method`` is the request's method block, already shape-checked by
    ``service.api.schemas.jobs.MethodSpec``: ``{"type": ..., "<type>": {params},
    "hyperparameters": {...}}`` (unset hyperparameters omitted). ``num_layers``: the base
    model's layer count, against which layer indices (LoRA's ``layers``) are checked.
    ``base_kind``: the kind of base the job trains, whose layer names the method's targets
    must use (``query`` on an encoder, ``q_proj`` on a decoder) and which only some methods
    train.
    """
    size = len(json.dumps(method, default=str))
    if size > MAX_METHOD_JSON_BYTES:
        raise MethodConfigError(
            f"method block is {size} bytes; at most {MAX_METHOD_JSON_BYTES} are allowed"
        )
    method_type = method.get("type")
    if not isinstance(method_type, str):
        raise MethodConfigError("method.type: a method type is required", param="type")
    if base_kind == "decoder" and method_type not in DECODER_METHODS:
        raise MethodConfigError(
            f"method.type: '{method_type}' does not train a decoder base; use one of "
            f"{list(DECODER_METHODS)}",
            param="type",
        )
    try:
        config = parse_method_config(method_type, dict(method.get(method_type) or {}), base_kind)
    except ConfigError as exc:
        # core names its own "type" field for an unknown method; anything else is a parameter.
        param = "type" if exc.field == "type" else param_from_loc(method_type, [exc.field])
        raise MethodConfigError(f"method.{param}: {_clean(exc.message)}", param=param) from None
    layers = getattr(config, "layers", None)
    if num_layers is not None and layers is not None:
        outside = sorted({i for i in layers if i >= num_layers})
        if outside:
            param = param_from_loc(method_type, ["layers"])
            raise MethodConfigError(
                f"method.{param}: {outside} out of range; the base model has "
                f"{num_layers} layers (0 to {num_layers - 1})",
                param=param,
            )
    try:
        parse_training_config(dict(method.get("hyperparameters") or {}))
    except ConfigError as exc:
        # "training" is core's name for the whole block (e.g. a non-mapping value).
        loc = [] if exc.field == "training" else [exc.field]
        param = param_from_loc("hyperparameters", loc)
        raise MethodConfigError(f"method.{param}: {_clean(exc.message)}", param=param) from None
