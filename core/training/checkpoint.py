"""Training checkpoints as one safe bytes blob: JSON for structure, safetensors for tensors.

Layout: ``b"LPXCKPT1"`` + 8-byte little-endian JSON length + UTF-8 JSON + safetensors bytes.
Nothing is ever unpickled: a checkpoint from the database is parsed like any user input.

:func:`adapter_from_checkpoint` serves a checkpoint as the adapter its job would have given had
it stopped at that step (OpenAI's ``fine_tuned_model_checkpoint``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from core.adapter import ADAPTER_FORMAT, Adapter
from core.errors import CoreError
from core.heads import HeadConfig
from core.methods import build_method, parse_method_config
from core.training.rng import forked_rng

if TYPE_CHECKING:
    from core.base import FrozenBase
    from core.decoder.base import DecoderBase

MAGIC = b"LPXCKPT1"
FORMAT = "loraplex.train_checkpoint/1"
_HEADER = struct.Struct("<Q")
PREFIX_SIZE = len(MAGIC) + _HEADER.size  # the magic and the JSON's length


class CheckpointError(CoreError):
    """Checkpoint bytes that cannot be parsed, or that belong to another job / data / base."""


def pack(meta: dict[str, Any], tensors: dict[str, Tensor]) -> bytes:
    js = json.dumps(meta, separators=(",", ":"), allow_nan=True).encode()
    st = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    return MAGIC + _HEADER.pack(len(js)) + js + st


def _read_meta(data: bytes) -> tuple[dict[str, Any], int]:
    """The JSON part and where the tensors start."""
    end = meta_size(data)
    if end > len(data):
        raise CheckpointError("truncated checkpoint")
    try:
        meta = json.loads(data[PREFIX_SIZE:end])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"bad checkpoint metadata: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"unsupported checkpoint format (expected {FORMAT})")
    return meta, end


def read_meta(data: bytes) -> dict[str, Any]:
    """Only the JSON part (step, epoch, configs, history): cheap, tensors are not parsed.
    ``data`` may end where the JSON does (:func:`meta_size`)."""
    return _read_meta(data)[0]


def meta_size(prefix: bytes) -> int:
    """How many leading bytes of a checkpoint :func:`read_meta` needs, from its first
    :data:`PREFIX_SIZE` or more: a reader of a stored checkpoint fetches only those."""
    if len(prefix) < PREFIX_SIZE or prefix[: len(MAGIC)] != MAGIC:
        raise CheckpointError("not a loraplex training checkpoint")
    return PREFIX_SIZE + _HEADER.unpack_from(prefix, len(MAGIC))[0]


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


# --- a checkpoint as an adapter ----------------------------------------------------------------


def checkpoint_adapter_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The config (``Adapter.config_dict()``'s shape) of the adapter a checkpoint's weights
    make, from its JSON alone (:func:`read_meta`): the method and base of its identity, the
    head as the trainer saves it with an adapter (``Trainer._served_head``). Its metrics are
    the checkpoint's step and its last validation's ``val_*``.

    Checkpoints saved before they recorded the served head cannot be served:
    :class:`CheckpointError`.
    """
    try:
        ident, served = meta["identity"], meta["adapter"]
        # Validated as an adapter's configs are: the JSON is read like any stored input.
        head = HeadConfig(**served["head"])
        method = dict(ident["method"])
        method_config = parse_method_config(method.pop("type"), method, head.base_kind)
        step = int(meta["position"]["step"])
        last_val = meta["state"].get("last_val") or {}
        return {
            "format": ADAPTER_FORMAT,
            "method": method_config.to_dict(),
            "head": head.model_dump(mode="json"),
            "base_name": str(served["base_name"]),
            "base_fingerprint": str(ident["base_fingerprint"]),
            "trainable_params": served["trainable_params"],
            "metrics": {"steps": step, **{f"val_{k}": v for k, v in dict(last_val).items()}},
        }
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint does not describe its adapter: {e!r:.80}") from None


def adapter_from_checkpoint(data: bytes, base: FrozenBase | DecoderBase) -> Adapter:
    """The adapter the checkpoint's job would have returned had it stopped at its step: the
    weights at that step (not the best ones so far), the configs the trainer saves an adapter
    with (:func:`checkpoint_adapter_config`).

    ``base`` is the job's base (refused otherwise, invariant 8): the checkpoint holds the
    trainable modules' ``state_dict`` (the trainer's ``model.method.*`` and ``model.head.*``),
    whose names are the method's modules' and become the adapter's (``saved_state``) only
    through a method built on its base. Raises :class:`CheckpointError` or
    :class:`~core.errors.AdapterFormatError`.
    """
    meta, tensors = unpack(data)
    head_state = unprefixed("model.head.", tensors)
    adapter = Adapter.from_config_dict(checkpoint_adapter_config(meta), {}, head_state)
    adapter.check_base(base)
    # A fresh method's initialisation draws random numbers: not from the caller's generators.
    with forked_rng(base.device):
        method = build_method(adapter.method, base)
    device = base.device
    try:
        method.load_state_dict(
            {k: v.to(device) for k, v in unprefixed("model.method.", tensors).items()}
        )
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its method: {e}") from None
    adapter.method_state = {k: v.detach().cpu().clone() for k, v in method.saved_state().items()}
    return adapter
