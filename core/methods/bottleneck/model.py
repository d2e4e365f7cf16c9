from __future__ import annotations

from torch import nn

from core.base import FrozenBase
from core.encoder import EncoderHooks
from core.methods.bottleneck.config import BottleneckConfig
from core.methods.bottleneck.layer import Bottleneck, BottleneckHooks
from core.methods.method import AdapterMethod


class BottleneckModel(AdapterMethod):
    """Adapters per layer; state names look like ``layer.3.ffn.down.weight`` so the shared
    ``param_layer`` finds the layer index for layer-wise LR decay."""

    config: BottleneckConfig

    def __init__(self, config: BottleneckConfig, base: FrozenBase) -> None:
        super().__init__(config, base)
        hidden = base.hidden_size
        self.layer = nn.ModuleList(
            nn.ModuleDict(
                {
                    where: Bottleneck(
                        hidden,
                        config.bottleneck_size,
                        config.non_linearity,
                        config.init_scale,
                        base.device,
                    )
                    for where in config.sites
                }
            )
            for _ in range(base.num_layers)
        )

    def hooks(self, dropout: bool = False) -> EncoderHooks:
        adapters: dict[tuple[int, str], Bottleneck] = {}
        for i, per_layer in enumerate(self.layer):
            for where, module in per_layer.items():
                adapters[(i, where)] = module
        return BottleneckHooks(adapters)
