"""One LoRA adapter merged into copies of the base's linears, for decode steps it has alone.

When every sequence of a decode step uses the same adapter, the step can run on
``W + scaling · B @ A`` at the adapter's sites (:class:`MergedHooks`) instead of the base's
weights plus each row's low-rank delta (:class:`core.generation.adapters.BagLoraHooks`):
the same arithmetic up to rounding, with no side path at any of its sites.

What it costs: a copy of every linear the adapter targets, in the base's dtype. SmolLM2-135M
with all seven targets on its 30 layers: 405 MiB in fp32 (half in bfloat16), one adapter's at
a time (:class:`core.generation.scheduler.Scheduler`). Building it (one ``addmm`` per site)
took 0.37 s on 2 loaded cores (AMX, fp32). A decode step on it, against the per-row deltas:
78 -> 86 -> 77 ms (bare, deltas, merged) at one sequence, 172 -> 180 -> 165 ms at eight, so a
merge pays after ~40 tokens at one sequence (``nice -n 10 python -m bench.generate_merged``).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor

from core.decoder.forward import DecoderWeights
from core.generation.adapters import LoraWeights
from core.inference.bank import Site


def merged_bytes(weights: DecoderWeights, adapter: LoraWeights) -> int:
    """Bytes the merged copy of ``adapter``'s sites takes (before building it)."""
    total = 0
    for layer, target in adapter.pairs:
        weight, _ = weights.layers[layer].linears[target]
        total += weight.numel() * weight.element_size()
    return total


class MergedLinears:
    """``W + scaling · B @ A`` at each of one adapter's sites, built at once."""

    def __init__(self, weights: DecoderWeights, adapter: LoraWeights) -> None:
        self.key: Hashable = adapter.key
        self.linears: dict[Site, Tensor] = {}
        for (layer, target), (a, b) in adapter.pairs.items():
            weight, _ = weights.layers[layer].linears[target]
            # In fp32 whatever the base's dtype, rounded once into it, as a merge on disk is.
            merged = torch.addmm(
                weight.float(),
                b.to(weight.device, torch.float32),
                a.to(weight.device, torch.float32),
                alpha=adapter.scaling,
            )
            self.linears[(layer, target)] = merged.to(weight.dtype)

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.linears.values())

    def hooks(self) -> MergedHooks:
        return MergedHooks(self.linears)


class MergedHooks:
    """The merged weight in place of the base's at the adapter's sites; nothing added."""

    def __init__(self, linears: dict[Site, Tensor]) -> None:
        self.linears = linears

    def weight(self, layer: int, target: str, weight: Tensor) -> Tensor:
        return self.linears.get((layer, target), weight)

    def linear(self, layer: int, target: str, x: Tensor, y: Tensor) -> Tensor:
        return y
