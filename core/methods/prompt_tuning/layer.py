"""Encoder hooks that prepend virtual tokens and strip them again."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.encoder import BertEncoder, EncoderHooks


def virtual_token_states(prompt: Tensor, encoder: BertEncoder) -> Tensor:
    """Embedding-layer output of the virtual tokens: ``LayerNorm(p_i + pos_i + type_0)``.

    This is what BERT's embedding layer computes when PEFT feeds the prompt as
    ``inputs_embeds`` at positions ``0..n-1`` with token type 0, so storing ``p`` (not the
    normalised vector) keeps our tensors identical to PEFT's ``prompt_embeddings``.
    """
    e = encoder.embeddings
    c = encoder.config
    n = prompt.shape[0]
    x = prompt + e.position_embeddings.weight[:n] + e.token_type_embeddings.weight[0]
    return F.layer_norm(x, (c.hidden_size,), e.LayerNorm.weight, e.LayerNorm.bias, c.layer_norm_eps)


class PromptHooks(EncoderHooks):
    """Prepends ``virtual`` ([n, hidden], already embedding-normalised) to every row."""

    def __init__(self, virtual: Tensor, dropout: float) -> None:
        self.virtual = virtual
        self.n = virtual.shape[0]
        self.dropout = dropout

    def position_ids(self, input_ids: Tensor) -> Tensor:
        seq = input_ids.shape[1]
        return torch.arange(self.n, self.n + seq, device=input_ids.device).unsqueeze(0)

    def embed(self, embeddings: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        bsz = embeddings.shape[0]
        # The real tokens already went through the embedding dropout; give the virtual ones
        # the same treatment so training matches PEFT (dropout after the embedding LayerNorm).
        v = self.virtual.to(embeddings.dtype).unsqueeze(0).expand(bsz, -1, -1)
        v = F.dropout(v, self.dropout, training=self.dropout > 0)  # a fresh mask per row
        ones = attention_mask.new_ones(bsz, self.n)
        return torch.cat([v, embeddings], dim=1), torch.cat([ones, attention_mask], dim=1)

    def strip(self, hidden: Tensor) -> Tensor:
        return hidden[:, self.n :]
