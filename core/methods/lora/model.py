from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from core.base import FrozenBase
from core.decoder.base import DecoderBase
from core.encoder import EncoderHooks
from core.errors import ConfigError
from core.methods.lora.config import LoraConfig
from core.methods.lora.layer import LoraHooks
from core.methods.method import AdapterMethod
from core.targets import DECODER_TARGET_MODULES, TARGET_MODULES, module_path


def lora_key(layer: int, target: str, which: str) -> str:
    """State name of a LoRA matrix: PEFT's module path, e.g.
    ``encoder.layer.0.attention.self.query.lora_A.weight`` or
    ``model.layers.0.self_attn.q_proj.lora_A.weight``."""
    return f"{module_path(layer, target)}.lora_{which}.weight"


class LoraModel(AdapterMethod):
    config: LoraConfig

    def __init__(self, config: LoraConfig, base: FrozenBase | DecoderBase) -> None:
        # AdapterMethod is typed for the encoder its other methods need; LoRA runs on either.
        super().__init__(config, base)  # type: ignore[arg-type]
        base_cfg = base.config
        own = DECODER_TARGET_MODULES if isinstance(base, DecoderBase) else TARGET_MODULES
        foreign = [t for t in config.target_modules if t not in own]
        if foreign:
            known = f"known: {list(own)}"
            raise ConfigError("target_modules", f"{foreign} are not layers of this base; {known}")
        layers = config.layers if config.layers is not None else range(base_cfg.num_hidden_layers)
        bad = [i for i in layers if not 0 <= i < base_cfg.num_hidden_layers]
        if bad:
            raise ConfigError("layers", f"layer index out of range: {bad}")
        self.sites: list[tuple[int, str]] = [(i, t) for i in layers for t in config.target_modules]
        # ParameterDict keys may not contain dots, so index parameters by position.
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for _, target in self.sites:
            n_in, n_out = base_cfg.linear_shape(target)
            a = torch.empty(config.r, n_in, device=base.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default init for A
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(n_out, config.r, device=base.device)))

    def pairs(self) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
        return {s: (a, b) for s, a, b in zip(self.sites, self.lora_A, self.lora_B, strict=True)}

    def hooks(self, dropout: bool = False) -> EncoderHooks:
        return LoraHooks(self.pairs(), self.config.scaling, self.config.dropout if dropout else 0.0)

    def saved_state(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for (i, t), a, b in zip(self.sites, self.lora_A, self.lora_B, strict=True):
            out[lora_key(i, t, "A")] = a.detach()
            out[lora_key(i, t, "B")] = b.detach()
        return out

    def load_saved_state(self, state: dict[str, Tensor]) -> None:
        expected = set(self.saved_state())
        if set(state) != expected:
            raise ValueError(
                f"LoRA state mismatch: missing={sorted(expected - set(state))[:4]} "
                f"unexpected={sorted(set(state) - expected)[:4]}"
            )
        with torch.no_grad():
            for (i, t), a, b in zip(self.sites, self.lora_A, self.lora_B, strict=True):
                for p, key in ((a, lora_key(i, t, "A")), (b, lora_key(i, t, "B"))):
                    if state[key].shape != p.shape:
                        raise ValueError(
                            f"{key}: shape {tuple(state[key].shape)} != {tuple(p.shape)}"
                        )
                    p.copy_(state[key])

    def param_layer(self, name: str) -> int | None:
        # Parameter names are lora_A.<k>; map back through the site list.
        idx = int(name.rsplit(".", 1)[-1])
        return self.sites[idx][0]
