"""A preallocated KV cache of ``slots`` sequences, each up to ``capacity`` tokens.

One running sequence owns one slot. Its tokens sit at columns ``0 .. length-1`` of its slot,
unpadded, so a token's column is its position (rotary embeddings need no offsets) and slots at
different lengths decode together with a per-slot attention mask (:mod:`core.generation.decode`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.decoder.config import DecoderConfig
from core.decoder.forward import DecoderWeights


def bytes_per_slot(config: DecoderConfig, capacity: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values one slot of ``capacity`` tokens takes (every layer)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * capacity * itemsize


def slots_for_budget(
    config: DecoderConfig, capacity: int, dtype: torch.dtype, budget_bytes: int
) -> int:
    """How many slots of ``capacity`` tokens fit in ``budget_bytes`` (0 if not even one)."""
    return budget_bytes // bytes_per_slot(config, capacity, dtype)


class SlotCache:
    """Keys and values ``[slots, kv_heads, capacity, head_dim]`` per layer, allocated once, in
    ``dtype`` (the weights' where None): attention runs in it (:mod:`core.hardware`)."""

    def __init__(
        self,
        weights: DecoderWeights,
        slots: int,
        capacity: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        if slots < 1 or capacity < 2:
            raise ValueError("a slot cache needs at least one slot of two tokens")
        c = weights.config
        shape = (slots, c.num_key_value_heads, capacity, c.head_dim)
        # Zeros, not empty: a decode step reads a slot's columns past its length (masked out),
        # and a NaN bit pattern there would still poison the masked softmax.
        self.keys: list[Tensor] = [
            torch.zeros(shape, dtype=dtype or weights.dtype, device=weights.device)
            for _ in range(c.num_hidden_layers)
        ]
        self.values: list[Tensor] = [torch.zeros_like(k) for k in self.keys]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def copy_columns(self, source: int, slots: list[int], tokens: int) -> None:
        """Copy columns ``0..tokens-1`` of slot ``source`` into each of ``slots``, every layer
        (a request's candidate starting from the prompt its first ones hold)."""
        for layer in (*self.keys, *self.values):
            for slot in slots:
                layer[slot, :, :tokens] = layer[source, :, :tokens]
