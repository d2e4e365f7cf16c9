"""One bottleneck adapter and the encoder hooks that apply a stack of them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.encoder import EncoderHooks

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


class Bottleneck(nn.Module):
    """``h + up(act(down(h)))``; ``up`` starts at zero so an untrained adapter is the identity."""

    def __init__(
        self, hidden: int, size: int, non_linearity: str, init_scale: float, device: torch.device
    ) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, size, device=device)
        self.up = nn.Linear(size, hidden, device=device)
        self.act = ACTIVATIONS[non_linearity]
        nn.init.normal_(self.down.weight, std=init_scale)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.act(self.down(h)))


class BottleneckHooks(EncoderHooks):
    """Applies the adapter of ``(layer, where)`` to that sub-layer's output (before the residual
    and LayerNorm, as in Houlsby et al. and adapter-transformers)."""

    def __init__(self, adapters: dict[tuple[int, str], Bottleneck]) -> None:
        self.adapters = adapters

    def sublayer_output(self, layer: int, where: str, h: Tensor) -> Tensor:
        adapter = self.adapters.get((layer, where))
        return h if adapter is None else adapter(h)
