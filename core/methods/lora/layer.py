"""LoRA's forward-pass hooks for one adapter: the unmerged (training) and merged paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.encoder import BertEncoder, EncoderHooks


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


def merge_pairs(
    encoder: BertEncoder,
    pairs: dict[tuple[int, str], tuple[Tensor, Tensor]],
    scaling: float,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> MergedLoraHooks:
    """``W + scale · B @ A`` for the targeted linears only, as copies in ``dtype``.

    ``pairs`` maps (layer, target) to ``(A [r, in], B [out, r])``. The sum is done in fp32
    from the encoder's weights, whatever ``dtype`` the copies are served in, so an fp16 merge
    rounds once instead of adding an already-rounded delta. The encoder is only read.
    """
    merged: dict[tuple[int, str], Tensor] = {}
    for (layer, target), (a, b) in pairs.items():
        w = encoder.target_linear(layer, target).weight
        w = w.detach().to(device=device, dtype=torch.float32)
        # detach: training-time pairs are parameters; a merged copy never trains.
        a32, b32 = a.detach().to(device, torch.float32), b.detach().to(device, torch.float32)
        merged[(layer, target)] = (w + (b32 @ a32) * scaling).to(dtype)  # [out, in]
    return MergedLoraHooks(merged)
