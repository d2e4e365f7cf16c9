from __future__ import annotations

import copy
import re

import torch
from torch import Tensor, nn

from core.base import FrozenBase
from core.decoder.base import DecoderBase
from core.decoder.forward import DecoderWeights
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


_DECODER_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


class DecoderFullModel(AdapterMethod):
    """Full fine-tuning of a decoder base: a trainable copy of every weight, under Hugging
    Face's names. The decoder's forward runs :meth:`decoder_weights` (the same arrangement as
    the frozen base's, over this copy) instead of the base's."""

    config: MethodConfig

    def __init__(self, config: MethodConfig, base: DecoderBase) -> None:
        super().__init__(config, base)  # type: ignore[arg-type]
        # ParameterDict keys may not contain dots; the state keeps Hugging Face's names.
        self.names = sorted(base.state_dict)
        self.copies = nn.ParameterList(
            nn.Parameter(base.state_dict[n].detach().clone()) for n in self.names
        )
        self._weights = DecoderWeights(base.config, dict(zip(self.names, self.copies, strict=True)))

    def decoder_weights(self) -> DecoderWeights:
        """The trainable copy, arranged per layer (its tensors are this module's parameters, so
        loading a state in place keeps it current)."""
        return self._weights

    def saved_state(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in zip(self.names, self.copies, strict=True)}

    def load_saved_state(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.names):
            missing, unexpected = set(self.names) - set(state), set(state) - set(self.names)
            raise ValueError(
                f"decoder state mismatch: missing={sorted(missing)[:4]} "
                f"unexpected={sorted(unexpected)[:4]}"
            )
        with torch.no_grad():
            for n, p in zip(self.names, self.copies, strict=True):
                if state[n].shape != p.shape:
                    raise ValueError(f"{n}: shape {tuple(state[n].shape)} != {tuple(p.shape)}")
                p.copy_(state[n])

    def param_layer(self, name: str) -> int | None:
        # Parameter names are copies.<k>; map back through the names. The embedding matrix is
        # below layer 0 (it is the tied output head too); the final norm and lm_head are top.
        hf_name = self.names[int(name.rsplit(".", 1)[-1])]
        if hf_name.startswith("model.embed_tokens."):
            return -1
        m = _DECODER_LAYER_RE.match(hf_name)
        return int(m.group(1)) if m else None
