"""A BERT-family encoder written as plain PyTorch with named extension points.

Why not call ``transformers.BertModel`` directly: every adaptation method (LoRA, bottleneck
adapters, prompt tuning, mixed multi-adapter batches) must change the forward pass *without
touching the shared frozen module*, because serving and training threads use the same base
weights at the same time. Hugging Face modules carry state (``.training``, injected layers);
this encoder carries none: dropout is an argument and all method behaviour enters through an
:class:`EncoderHooks` object passed per call.

Parameter names match Hugging Face's ``BertModel`` so ``model.safetensors`` loads as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.targets import TARGET_PATHS


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> EncoderConfig:
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: cfg[k] for k in names if k in cfg})

    def linear_shape(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of a target linear layer."""
        h, i = self.hidden_size, self.intermediate_size
        if target == "intermediate.dense":
            return h, i
        if target == "output.dense":
            return i, h
        return h, h


class EncoderHooks:
    """Extension points of the forward pass. The default implementation changes nothing.

    Methods override what they need. Every hook receives tensors for the whole batch; a hook for
    a mixed multi-adapter batch decides per row.
    """

    def position_ids(self, input_ids: Tensor) -> Tensor | None:
        """Position ids of the real tokens (``[1, S]`` or ``[B, S]``); None means ``0..S-1``.

        Prompt tuning returns ``n..n+S-1``: its ``n`` virtual tokens take positions ``0..n-1``,
        exactly as PEFT's prompt tuning lays them out.
        """
        return None

    def embed(self, embeddings: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Called on the embedding output; may prepend virtual tokens (prompt tuning)."""
        return embeddings, attention_mask

    def weight(self, layer: int, target: str, weight: Tensor) -> Tensor:
        """The weight a target linear uses (merged adapters return ``W + scale * B @ A``)."""
        return weight

    def linear(self, layer: int, target: str, x: Tensor, y: Tensor) -> Tensor:
        """Called after each target linear: ``y = x W^T + b``. Returns the adapted output."""
        return y

    def sublayer_output(self, layer: int, where: str, h: Tensor) -> Tensor:
        """Called on a sub-layer's projected output before residual + LayerNorm.

        ``where`` is ``"attention"`` or ``"ffn"`` (bottleneck adapters sit here).
        """
        return h

    def strip(self, hidden: Tensor) -> Tensor:
        """Undo ``embed``'s extra positions so outputs align with the real tokens."""
        return hidden


NO_HOOKS = EncoderHooks()


class _Linear(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.weight, std=0.02)


class _LayerNorm(nn.LayerNorm):
    pass


class _Embeddings(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = _LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        for emb in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            nn.init.normal_(emb.weight, std=0.02)


class _SelfAttention(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.query = _Linear(c.hidden_size, c.hidden_size)
        self.key = _Linear(c.hidden_size, c.hidden_size)
        self.value = _Linear(c.hidden_size, c.hidden_size)


class _DenseLN(nn.Module):
    def __init__(self, n_in: int, n_out: int, eps: float) -> None:
        super().__init__()
        self.dense = _Linear(n_in, n_out)
        self.LayerNorm = _LayerNorm(n_out, eps=eps)


class _Attention(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _DenseLN(c.hidden_size, c.hidden_size, c.layer_norm_eps)


class _Intermediate(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = _Linear(c.hidden_size, c.intermediate_size)


class _Layer(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _DenseLN(c.intermediate_size, c.hidden_size, c.layer_norm_eps)


class _LayerStack(nn.Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class BertEncoder(nn.Module):
    """BERT encoder (embeddings + transformer layers). Returns the last hidden states."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _LayerStack(config)
        self._act = _ACTIVATIONS[config.hidden_act]

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def target_linear(self, layer: int, target: str) -> _Linear:
        module: nn.Module = self.encoder.layer[layer]
        for part in TARGET_PATHS[target].split("."):
            module = getattr(module, part)
        assert isinstance(module, _Linear)
        return module

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        hooks: EncoderHooks = NO_HOOKS,
        dropout: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(hidden, attention_mask)`` for the real tokens (virtual ones stripped).

        ``dropout`` turns on the model's hidden and attention dropout (training); the module's
        own ``.training`` flag is ignored on purpose so a shared frozen base never changes mode.
        """
        c = self.config
        p_hidden = c.hidden_dropout_prob if dropout else 0.0
        p_attn = c.attention_probs_dropout_prob if dropout else 0.0
        seq = input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = hooks.position_ids(input_ids)
        if positions is None:
            positions = torch.arange(seq, device=input_ids.device).unsqueeze(0)
        e = self.embeddings
        h = e.word_embeddings(input_ids) + e.token_type_embeddings(token_type_ids)
        h = h + e.position_embeddings(positions)
        h = F.layer_norm(
            h, (c.hidden_size,), e.LayerNorm.weight, e.LayerNorm.bias, c.layer_norm_eps
        )
        h = F.dropout(h, p_hidden, training=dropout)
        h, mask = hooks.embed(h, attention_mask)

        n_heads = c.num_attention_heads
        head_dim = c.hidden_size // n_heads
        # Boolean key mask broadcast over heads and query positions; True = attend.
        attn_mask = mask.bool()[:, None, None, :]
        for i, layer in enumerate(self.encoder.layer):
            h = self._layer(i, layer, h, attn_mask, hooks, n_heads, head_dim, p_hidden, p_attn)
        return hooks.strip(h), attention_mask

    def _lin(self, hooks: EncoderHooks, i: int, target: str, lin: _Linear, x: Tensor) -> Tensor:
        y = F.linear(x, hooks.weight(i, target, lin.weight), lin.bias)
        return hooks.linear(i, target, x, y)

    def _layer(
        self,
        i: int,
        layer: _Layer,
        h: Tensor,
        attn_mask: Tensor,
        hooks: EncoderHooks,
        n_heads: int,
        head_dim: int,
        p_hidden: float,
        p_attn: float,
    ) -> Tensor:
        c = self.config
        bsz, seq, width = h.shape
        sa = layer.attention.self

        def heads(t: Tensor) -> Tensor:
            return t.view(bsz, seq, n_heads, head_dim).transpose(1, 2)

        q = heads(self._lin(hooks, i, "query", sa.query, h))
        k = heads(self._lin(hooks, i, "key", sa.key, h))
        v = heads(self._lin(hooks, i, "value", sa.value, h))
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=p_attn, scale=1.0 / math.sqrt(head_dim)
        )
        ctx = ctx.transpose(1, 2).reshape(bsz, seq, width)

        ao = layer.attention.output
        a = self._lin(hooks, i, "attention.output.dense", ao.dense, ctx)
        a = hooks.sublayer_output(i, "attention", F.dropout(a, p_hidden, training=p_hidden > 0))
        h = F.layer_norm(a + h, (width,), ao.LayerNorm.weight, ao.LayerNorm.bias, c.layer_norm_eps)

        inter = self._act(self._lin(hooks, i, "intermediate.dense", layer.intermediate.dense, h))
        fo = layer.output
        f = self._lin(hooks, i, "output.dense", fo.dense, inter)
        f = hooks.sublayer_output(i, "ffn", F.dropout(f, p_hidden, training=p_hidden > 0))
        return F.layer_norm(
            f + h, (width,), fo.LayerNorm.weight, fo.LayerNorm.bias, c.layer_norm_eps
        )


def pool(hidden: Tensor, attention_mask: Tensor, mode: str) -> Tensor:
    """Sentence embedding from token states: ``mean`` over real tokens, or the ``cls`` token."""
    if mode == "cls":
        return hidden[:, 0]
    if mode != "mean":
        raise ValueError(f"unknown pooling mode {mode!r}")
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
