"""Helpers shared by the decoder tests (core and service): hand-made decoder LoRA adapters."""

from __future__ import annotations

import torch

from core.adapter import Adapter
from core.decoder.base import DecoderBase
from core.heads import HeadConfig
from core.methods.config import MethodConfig
from core.methods.lora.config import LoraConfig
from core.methods.lora.model import lora_key


def random_decoder_lora(
    decoder: DecoderBase,
    method: MethodConfig,
    head: HeadConfig,
    gen: torch.Generator,
    scale: float = 1.0,
) -> Adapter:
    """A LoRA adapter of ``decoder`` with random A and B (times ``scale``) on ``method``'s
    targets in its layers (all when it names none): B is not PEFT's zero, so the adapter
    changes the logits. Drawn layer by layer, target by target, A before B, from ``gen``."""
    assert isinstance(method, LoraConfig) and isinstance(method.target_modules, list)
    layers = method.layers if method.layers is not None else range(decoder.num_layers)
    state: dict[str, torch.Tensor] = {}
    for layer in layers:
        for target in method.target_modules:
            n_in, n_out = decoder.config.linear_shape(target)
            state[lora_key(layer, target, "A")] = torch.randn(method.r, n_in, generator=gen) * scale
            state[lora_key(layer, target, "B")] = (
                torch.randn(n_out, method.r, generator=gen) * scale
            )
    return Adapter(
        method=method,
        head=head,
        method_state=state,
        head_state={},
        base_name=decoder.name,
        base_fingerprint=decoder.fingerprint,
    )
