"""Training checkpoints as one safe bytes blob: JSON for structure, safetensors for tensors.

Layout: ``b"LPXCKPT1"`` + 8-byte little-endian JSON length + UTF-8 JSON + safetensors bytes.
Nothing is ever unpickled: a checkpoint from the database is parsed like any user input.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from core.errors import CoreError

MAGIC = b"LPXCKPT1"
FORMAT = "loraplex.train_checkpoint/1"
_HEADER = struct.Struct("<Q")


class CheckpointError(CoreError):
    """Checkpoint bytes that cannot be parsed, or that belong to another job / data / base."""


def pack(meta: dict[str, Any], tensors: dict[str, Tensor]) -> bytes:
    js = json.dumps(meta, separators=(",", ":"), allow_nan=True).encode()
    st = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    return MAGIC + _HEADER.pack(len(js)) + js + st


def _read_meta(data: bytes) -> tuple[dict[str, Any], int]:
    """The JSON part and where the tensors start."""
    head = len(MAGIC) + _HEADER.size
    if len(data) < head or data[: len(MAGIC)] != MAGIC:
        raise CheckpointError("not a loraplex training checkpoint")
    (n,) = _HEADER.unpack_from(data, len(MAGIC))
    if n > len(data) - head:
        raise CheckpointError("truncated checkpoint")
    try:
        meta = json.loads(data[head : head + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"bad checkpoint metadata: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"unsupported checkpoint format (expected {FORMAT})")
    return meta, head + n


def read_meta(data: bytes) -> dict[str, Any]:
    """Only the JSON part (step, epoch, configs, history): cheap, tensors are not parsed."""
    return _read_meta(data)[0]


def unpack(data: bytes) -> tuple[dict[str, Any], dict[str, Tensor]]:
    meta, start = _read_meta(data)
    try:
        tensors = st_load(bytes(data[start:]))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"bad checkpoint tensors: {e}") from None
    return meta, tensors


# --- named tensors ---------------------------------------------------------------------------


def prefixed(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` under ``prefix`` (e.g. ``"model."``), to share one flat safetensors dict."""
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors :func:`prefixed` put under ``prefix``, with their own names back."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# --- optimizer state ---------------------------------------------------------------------------


def optimizer_to_parts(sd: dict[str, Any], prefix: str = "optim.") -> tuple[dict, dict]:
    """Split ``optimizer.state_dict()`` into JSON structure and named tensors."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [_jsonable(g) for g in sd["param_groups"]]
    return {"param_groups": groups, "scalars": scalars}, tensors


def optimizer_from_parts(
    meta: dict[str, Any], tensors: dict[str, Tensor], prefix: str = "optim."
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in unprefixed(prefix, tensors).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# --- learning-rate scheduler -------------------------------------------------------------------

# The scheduler's own counters: LRScheduler.load_state_dict would set any key as an attribute.
_SCHEDULER_KEYS = {
    "base_lrs", "last_epoch", "_step_count", "_is_initial", "_get_lr_called_within_step",
    "_last_lr",
}  # fmt: skip


def scheduler_to_json(scheduler: LRScheduler) -> dict[str, Any]:
    """``scheduler.state_dict()`` as JSON (``LambdaLR`` saves its plain-function lambdas as
    None placeholders: they are rebuilt from the config)."""
    return _jsonable(scheduler.state_dict())


def scheduler_from_json(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A ``LambdaLR.load_state_dict`` argument from :func:`scheduler_to_json`'s output: only
    the counters, and one None placeholder per lambda (which keeps the rebuilt lambdas)."""
    sched = {k: v for k, v in meta.items() if k in _SCHEDULER_KEYS}
    return {**sched, "lr_lambdas": [None] * len(sched["base_lrs"])}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    return value
