"""What every adaptation method provides.

A method is two things: a validated config (:mod:`core.methods.config`, torch-free, JSON
round-trippable) and an ``AdapterMethod`` module holding only that method's trainable tensors.
The frozen base is never part of a method's state; methods change the forward pass through
:class:`EncoderHooks`.
"""

from __future__ import annotations

import re
from typing import ClassVar

from torch import Tensor, nn

from core.base import FrozenBase
from core.encoder import NO_HOOKS, BertEncoder, EncoderHooks
from core.methods.config import MethodConfig

_LAYER_RE = re.compile(r"(?:^|\.)layer\.(\d+)\.")


def layer_index(param_name: str) -> int | None:
    """Transformer layer a parameter belongs to (``...layer.3....`` → 3), None if none."""
    m = _LAYER_RE.search(param_name)
    return int(m.group(1)) if m else None


class AdapterMethod(nn.Module):
    """Trainable part of an adapter. Subclasses keep the frozen base out of their state."""

    config: MethodConfig
    # Feature extraction trains only the head on cached base features.
    frozen_features: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, base: FrozenBase) -> None:
        super().__init__()
        self.config = config
        self._base = [base]  # a list so nn.Module does not register the base as a submodule

    @property
    def base(self) -> FrozenBase:
        return self._base[0]

    @property
    def max_input_length(self) -> int:
        """Most real tokens one input may have: the base's limit minus reserved positions."""
        return self.base.max_length - self.config.reserved_positions

    def encoder(self) -> BertEncoder:
        """Encoder weights to run: the shared frozen base unless the method owns a copy."""
        return self.base.encoder

    def hooks(self, dropout: bool = False) -> EncoderHooks:
        return NO_HOOKS

    def saved_state(self) -> dict[str, Tensor]:
        """Tensors stored with the adapter (names are stable across versions)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_saved_state(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"adapter state mismatch: missing={missing[:4]} unexpected={unexpected[:4]}"
            )

    def param_layer(self, name: str) -> int | None:
        """Encoder layer of a parameter for layer-wise LR decay and unfreezing.

        -1 means the embeddings (below layer 0); None means "top" (full learning rate).
        """
        if "embeddings" in name or "prompt" in name:
            return -1
        return layer_index(name)
