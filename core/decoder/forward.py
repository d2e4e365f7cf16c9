"""A Llama-family decoder as a stateless function over frozen weights, with a KV cache.

Why not run ``transformers.LlamaForCausalLM``: as with the encoder (core/encoder.py), every
method changes the forward pass per call without touching weights that serving and training
threads share. This forward owns no state at all: the weights are a frozen mapping under Hugging
Face's names, dropout does not exist in Llama, and methods enter through the linear hook points
(``hooks.weight`` / ``hooks.linear``, the same two that :class:`core.encoder.EncoderHooks`
defines, so LoRA's hooks apply unchanged). The target names are PEFT's (``q_proj`` ...).

Padding is on the left (the last position of every row is its newest token, which generation
and last-token pooling need); positions count real tokens only, so a left-padded row computes
exactly what it would alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from core.decoder.config import DecoderConfig
from core.targets import DECODER_TARGET_PATHS


class LinearHooks(Protocol):
    """The hook points a decoder calls: every :class:`core.encoder.EncoderHooks` is one."""

    def weight(self, layer: int, target: str, weight: Tensor) -> Tensor: ...

    def linear(self, layer: int, target: str, x: Tensor, y: Tensor) -> Tensor: ...


class _NoHooks:
    def weight(self, layer: int, target: str, weight: Tensor) -> Tensor:
        return weight

    def linear(self, layer: int, target: str, x: Tensor, y: Tensor) -> Tensor:
        return y


NO_HOOKS: LinearHooks = _NoHooks()


@dataclass(frozen=True)
class _Layer:
    input_norm: Tensor
    post_attention_norm: Tensor
    # target name -> (weight [out, in], bias or None)
    linears: dict[str, tuple[Tensor, Tensor | None]]


class DecoderWeights:
    """The state dict's tensors arranged per layer once, so a decode step does no name lookups.

    Holds references, never copies: the tensors are the ones in ``state_dict``.
    """

    def __init__(self, config: DecoderConfig, state_dict: Mapping[str, Tensor]) -> None:
        self.config = config
        self._state_dict = state_dict
        self.embed = state_dict["model.embed_tokens.weight"]
        self.norm = state_dict["model.norm.weight"]
        self.lm_head = self.embed if config.tie_word_embeddings else state_dict["lm_head.weight"]
        self.layers: list[_Layer] = []
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}."
            linears = {}
            for target, path in DECODER_TARGET_PATHS.items():
                linears[target] = (
                    state_dict[f"{prefix}{path}.weight"],
                    state_dict.get(f"{prefix}{path}.bias"),
                )
            self.layers.append(
                _Layer(
                    state_dict[f"{prefix}input_layernorm.weight"],
                    state_dict[f"{prefix}post_attention_layernorm.weight"],
                    linears,
                )
            )
        self.inv_freq = rope_inv_freq(config).to(self.embed.device)

    def to(self, dtype: torch.dtype) -> DecoderWeights:
        """These weights in ``dtype``: ``self`` if they already are, else a converted copy."""
        if dtype == self.dtype:
            return self
        return DecoderWeights(self.config, {k: v.to(dtype) for k, v in self._state_dict.items()})

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device


def rope_inv_freq(config: DecoderConfig) -> Tensor:
    """Rotary frequencies ``[head_dim / 2]`` (fp32), as transformers' rope init computes them."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = dict(config.rope_scaling or ())
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor, low = scaling["factor"], scaling["low_freq_factor"]
        high = scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, preallocated to ``capacity`` positions.

    For inference only (it is written in place). The caller's ``attention_mask`` covers
    every cached position and grows by one column with each step: 1 for a real token, 0 for
    left padding.
    """

    keys: list[Tensor]  # per layer [B, kv_heads, capacity, head_dim]
    values: list[Tensor]
    length: int = 0

    @classmethod
    def allocate(cls, weights: DecoderWeights, batch: int, capacity: int) -> KVCache:
        c = weights.config
        shape = (batch, c.num_key_value_heads, capacity, c.head_dim)

        def buffers() -> list[Tensor]:
            return [
                torch.empty(shape, dtype=weights.dtype, device=weights.device)
                for _ in range(c.num_hidden_layers)
            ]

        return cls(buffers(), buffers())

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # In fp32 whatever the weights' dtype, as Hugging Face's LlamaRMSNorm does.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Each token's position among its row's real tokens (left padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` ``[B, longest]`` with each row's padding on its left."""
    if not rows or any(not r for r in rows):
        raise ValueError("every row needs at least one token")
    longest = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def forward(
    weights: DecoderWeights,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    hooks: LinearHooks = NO_HOOKS,
    cache: KVCache | None = None,
    prefix: Tensor | None = None,
) -> Tensor:
    """Final (normed) hidden states ``[B, S, hidden]`` of ``input_ids`` ``[B, S]``.

    ``attention_mask`` is ``[B, past + S]`` (``past`` = the cache's length, 0 without one);
    None means no padding anywhere. With a cache the new keys and values are appended to it.

    ``prefix`` (prompt tuning): embeddings ``[n, hidden]`` (or ``[B, n, hidden]``) put before
    every row's tokens, padding included, at positions ``0..n-1`` as PEFT's prompt tuning puts
    its virtual tokens; the real tokens' positions start at ``n``. ``attention_mask`` still
    covers the real tokens only, and the hidden states returned are theirs. Not with a cache.
    """
    c = weights.config
    bsz, seq = input_ids.shape
    h = F.embedding(input_ids, weights.embed)
    n_prefix = 0
    if prefix is not None:
        if cache is not None:
            raise ValueError("a prefix is not supported with a KV cache")
        n_prefix = prefix.shape[-2]
        h = torch.cat((prefix.to(h.dtype).expand(bsz, n_prefix, -1), h), dim=1)
        seq += n_prefix
        if attention_mask is not None:
            ones = attention_mask.new_ones(bsz, n_prefix)
            attention_mask = torch.cat((ones, attention_mask), dim=1)
    past = cache.length if cache is not None else 0
    if cache is not None and past + seq > cache.capacity:
        raise ValueError(f"KV cache full: {past} + {seq} tokens > capacity {cache.capacity}")
    if attention_mask is None:
        positions = torch.arange(past, past + seq, device=input_ids.device).expand(bsz, seq)
        # Without padding, a prefill into an empty cache is SDPA's plain causal case and one
        # new token attends to every cached key: neither needs a mask.
        mask = None
        if past > 0 and seq > 1:
            real = torch.ones(bsz, past + seq, dtype=torch.bool, device=input_ids.device)
            mask = _attention_mask(real, past, seq)
    else:
        if attention_mask.shape != (bsz, past + seq):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != {(bsz, past + seq)}"
            )
        positions = positions_from_mask(attention_mask)[:, past:]
        mask = _attention_mask(attention_mask.bool(), past, seq)

    freqs = positions[..., None].float() * weights.inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    cos = angles.cos().to(weights.dtype)[:, None]  # [B, 1, S, head_dim]
    sin = angles.sin().to(weights.dtype)[:, None]

    for i, layer in enumerate(weights.layers):
        x = _rms_norm(h, layer.input_norm, c.rms_norm_eps)
        h = h + _attention(weights, i, layer, x, cos, sin, mask, hooks, cache, past)
        x = _rms_norm(h, layer.post_attention_norm, c.rms_norm_eps)
        gate = _linear(hooks, i, "gate_proj", layer, x)
        up = _linear(hooks, i, "up_proj", layer, x)
        h = h + _linear(hooks, i, "down_proj", layer, F.silu(gate) * up)
    if cache is not None:
        cache.length = past + seq
    return _rms_norm(h[:, n_prefix:], weights.norm, c.rms_norm_eps)


# Up to this many rows, logits come from ``lm_head @ hiddenᵀ``: with the [vocab, hidden]
# matrix as the GEMM's left operand MKL does not repack it on every call. SmolLM2's 49152 x 576
# head on 2 cores: 30 vs 69 ms at 8 rows, 83 vs 125 ms at 32, equal at 1; the same dot products.
_FEW_ROWS = 64


def logits(weights: DecoderWeights, hidden: Tensor) -> Tensor:
    """Next-token logits ``[..., vocab]`` from :func:`forward`'s hidden states."""
    rows = hidden.shape[:-1].numel()
    if 1 < rows <= _FEW_ROWS:
        flat = hidden.reshape(rows, hidden.shape[-1])
        return torch.mm(weights.lm_head, flat.t()).t().reshape(*hidden.shape[:-1], -1)
    return F.linear(hidden, weights.lm_head)


def _attention_mask(key_real: Tensor, past: int, seq: int) -> Tensor:
    """``[B, 1, S, past + S]``, True = attend: real keys at or before the query's own position.

    Every query also attends to itself, so a padding query's row is never empty (SDPA would
    return NaN for it); padding outputs are never read.
    """
    total = past + seq
    query_pos = torch.arange(past, total, device=key_real.device)[:, None]
    key_pos = torch.arange(total, device=key_real.device)[None, :]
    causal = key_pos <= query_pos  # [S, T]
    return (key_real[:, None, None, :] & causal) | (key_pos == query_pos)


def _linear(hooks: LinearHooks, i: int, target: str, layer: _Layer, x: Tensor) -> Tensor:
    weight, bias = layer.linears[target]
    return hooks.linear(i, target, x, _project(x, hooks.weight(i, target, weight), bias))


def _project(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear``; a decode step's few fp32 rows (without autograd) as ``weight @ xᵀ``,
    which MKL runs without repacking the weight (see ``_FEW_ROWS``). SmolLM2's 1536 x 576
    linears, 40 of them out of cache on 2 cores: 44 -> 29 ms at 8 rows, 83 -> 65 ms at 32.
    bf16 goes to oneDNN instead, where ``F.linear`` is as fast or faster and needs no
    transposed copy of the output: SmolLM2's decode step + logits at 32 rows on 2 loaded AMX
    cores, 15 alternations, 157 -> 138 ms (equal at 8 and 16 rows)."""
    rows = x.shape[:-1].numel()
    if not 1 < rows <= _FEW_ROWS or torch.is_grad_enabled() or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    y = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], -1)


def _attention(
    weights: DecoderWeights,
    i: int,
    layer: _Layer,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor | None,
    hooks: LinearHooks,
    cache: KVCache | None,
    past: int,
) -> Tensor:
    c = weights.config
    bsz, seq, _ = x.shape

    def heads(t: Tensor, n: int) -> Tensor:
        return t.view(bsz, seq, n, c.head_dim).transpose(1, 2)

    q = heads(_linear(hooks, i, "q_proj", layer, x), c.num_attention_heads)
    k = heads(_linear(hooks, i, "k_proj", layer, x), c.num_key_value_heads)
    v = heads(_linear(hooks, i, "v_proj", layer, x), c.num_key_value_heads)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    if cache is not None:
        cache.keys[i][:, :, past : past + seq] = k
        cache.values[i][:, :, past : past + seq] = v
        k = cache.keys[i][:, :, : past + seq]
        v = cache.values[i][:, :, : past + seq]
    ctx = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None and seq > 1,  # no mask and several tokens: an empty cache
        scale=c.head_dim**-0.5,
        enable_gqa=c.kv_groups > 1,
    )
    ctx = ctx.transpose(1, 2).reshape(bsz, seq, c.num_attention_heads * c.head_dim)
    return _linear(hooks, i, "o_proj", layer, ctx)
