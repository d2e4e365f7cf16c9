from __future__ import annotations

import copy

from torch import Tensor

from core.base import FrozenBase
from core.encoder import BertEncoder
from core.methods.config import MethodConfig
from core.methods.method import AdapterMethod, layer_index


class FullModel(AdapterMethod):
    """Owns a trainable deep copy of the base encoder; the shared base stays untouched."""

    # FullConfig, or ScratchConfig for the subclass that starts from random weights.
    config: MethodConfig

    def __init__(self, config: MethodConfig, base: FrozenBase) -> None:
        super().__init__(config, base)
        # Not named ``encoder``: that name is AdapterMethod's accessor.
        self.bert = self._initial_encoder(base).requires_grad_(True)

    def _initial_encoder(self, base: FrozenBase) -> BertEncoder:
        return copy.deepcopy(base.encoder)

    def encoder(self) -> BertEncoder:
        return self.bert

    def saved_state(self) -> dict[str, Tensor]:
        """The whole encoder, under Hugging Face ``BertModel`` names (``encoder.layer.0...``)."""
        return {k: v.detach() for k, v in self.bert.state_dict().items()}

    def load_saved_state(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.bert.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"encoder state mismatch: missing={missing[:4]} unexpected={unexpected[:4]}"
            )

    def param_layer(self, name: str) -> int | None:
        if "embeddings." in name:
            return -1
        return layer_index(name)
