"""Adapters as bytes: safetensors for tensors, JSON for configs. Never pickle."""

from __future__ import annotations

import json
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from core.adapter import Adapter
from core.errors import AdapterFormatError

_HEAD_PREFIX = "head."
_METHOD_PREFIX = "method."


def tensors_to_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def tensors_from_bytes(data: bytes) -> dict[str, Tensor]:
    """Parse safetensors bytes; anything else (pickle, truncated data) is a format error."""
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise AdapterFormatError(f"not a valid safetensors file: {e}") from None


def adapter_to_bytes(adapter: Adapter) -> tuple[dict[str, Any], bytes]:
    """``(config_json, safetensors_bytes)``: what the database stores for an adapter."""
    tensors = {_METHOD_PREFIX + k: v for k, v in adapter.method_state.items()}
    tensors.update({_HEAD_PREFIX + k: v for k, v in adapter.head_state.items()})
    config = adapter.config_dict()
    return config, tensors_to_bytes(tensors, {"loraplex": json.dumps(config["method"])})


def adapter_from_bytes(config: dict[str, Any], data: bytes) -> Adapter:
    tensors = tensors_from_bytes(data)
    method_state = {
        k[len(_METHOD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_METHOD_PREFIX)
    }
    head_state = {
        k[len(_HEAD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_HEAD_PREFIX)
    }
    if len(method_state) + len(head_state) != len(tensors):
        raise AdapterFormatError("unexpected tensor names in adapter weights")
    return Adapter.from_config_dict(config, method_state, head_state)
