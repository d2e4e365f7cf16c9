from __future__ import annotations

import torch

from core.base import FrozenBase
from core.encoder import BertEncoder
from core.methods.full.model import FullModel


class ScratchModel(FullModel):
    """Like :class:`FullModel` (same state names, all trainable) but randomly initialised."""

    def _initial_encoder(self, base: FrozenBase) -> BertEncoder:
        # BertEncoder's constructor already draws N(0, 0.02) for linears and embeddings with
        # zero biases and unit LayerNorms, i.e. BERT's init; like Hugging Face we also zero the
        # padding token's embedding.
        enc = BertEncoder(base.config).to(base.device)
        with torch.no_grad():
            enc.embeddings.word_embeddings.weight[base.config.pad_token_id].zero_()
        return enc
