"""Validation of a job's ``method`` block against the core library.

LEAD: this is the one seam to wire to core. Replace the body of :func:`validate_method` with

    from core.methods import parse_method_config
    from core.training import TrainingConfig

    parse_method_config(method["type"], method.get(method["type"]) or {})
    TrainingConfig(**method.get("hyperparameters", {}))

and translate their errors into :class:`MethodConfigError` with ``param`` relative to
``method`` (e.g. ``"lora.r"``, ``"hyperparameters.learning_rate"``); the route turns it into a
422 whose ``param`` is ``method.<param>``. For pydantic errors, :func:`param_from_loc` builds it.
Imports stay inside the function so importing the API does not import torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

# Method blocks are small; anything bigger is a mistake or abuse.
MAX_METHOD_JSON_BYTES = 64 * 1024


class MethodConfigError(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def param_from_loc(prefix: str, loc: Sequence[str | int]) -> str:
    """``("hyperparameters", ("learning_rate",))`` → ``hyperparameters.learning_rate``."""
    return ".".join([prefix, *(str(p) for p in loc)]) if loc else prefix


def validate_method(method: dict[str, Any]) -> None:
    """Raise :class:`MethodConfigError` if ``method`` is not a trainable configuration.

    ``method`` is the request's method block, already shape-checked by
    ``service.api.schemas.jobs.MethodSpec``: ``{"type": ..., "<type>": {params},
    "hyperparameters": {...}}`` (unset hyperparameters omitted).
    """
    size = len(json.dumps(method, default=str))
    if size > MAX_METHOD_JSON_BYTES:
        raise MethodConfigError(
            f"method block is {size} bytes; at most {MAX_METHOD_JSON_BYTES} are allowed"
        )
    # TODO(lead): delegate to core.methods.parse_method_config and core.training.TrainingConfig
    # (see the module docstring). Until then only the shape checks of MethodSpec apply.
