"""LoRA's forward-pass hooks for one adapter: the unmerged (training) and merged paths."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from core.encoder import EncoderHooks


def lora_delta_weight(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``scale · B @ A``: the dense update a LoRA pair adds to ``W`` (shared by merge paths)."""
    return (b @ a) * scaling


class LoraHooks(EncoderHooks):
    """Adds ``scale · B(A(dropout(x)))`` after each targeted linear."""

    def __init__(
        self, pairs: dict[tuple[int, str], tuple[Tensor, Tensor]], scaling: float, dropout: float
    ) -> None:
        self.pairs = pairs
        self.scaling = scaling
        self.dropout = dropout

    def linear(self, layer: int, target: str, x: Tensor, y: Tensor) -> Tensor:
        pair = self.pairs.get((layer, target))
        if pair is None:
            return y
        a, b = pair
        if self.dropout:
            x = F.dropout(x, self.dropout, training=True)
        return y + F.linear(F.linear(x, a), b) * self.scaling


class MergedLoraHooks(EncoderHooks):
    """Runs targeted linears with precomputed ``W + scale · B @ A`` (copies; base untouched)."""

    def __init__(self, merged: dict[tuple[int, str], Tensor]) -> None:
        self.merged = merged

    def weight(self, layer: int, target: str, weight: Tensor) -> Tensor:
        return self.merged.get((layer, target), weight)
