"""One prefill pass for several prompts, packed end to end (no padding), each into its slots.

The prompts' tokens are one batch of ``T`` rows for every linear (where a prefill's time goes,
and where one pass over the weights for all prompts pays), each prompt's rows carrying its
adapter (:class:`core.generation.adapters.SegmentLoraHooks`); attention runs per prompt, causal
over its own tokens at positions ``0..len-1``, exactly as that prompt's prefill alone, and
writes its keys and values into the prompt's cache slot(s). Padding the prompts to the longest
instead would spend the budget on padding: prompts of 20-200 tokens are about half padding.

A prompt may also be the next chunk of one whose earlier tokens are already in its slot
(chunked prefill, :mod:`core.generation.scheduler`): its tokens sit at positions
``past..past+len-1`` and attend to the slot's ``past`` cached tokens as well as causally to
each other, which is what the whole prompt's pass computes for them.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from core.decoder.forward import (
    NO_HOOKS,
    DecoderWeights,
    LinearHooks,
    _linear,
    _rms_norm,
    _rotate_half,
)
from core.generation.kv import SlotCache


def prefill(
    weights: DecoderWeights,
    cache: SlotCache,
    prompts: list[list[int]],
    slots: list[list[int]],
    hooks: LinearHooks = NO_HOOKS,
    past: list[int] | None = None,
) -> Tensor:
    """Final hidden states ``[len(prompts), hidden]`` of each prompt's last token.

    ``slots[r]``: the cache slots prompt ``r``'s keys and values go to (its ``n`` candidates
    share them). ``hooks`` see the packed tokens as rows ``[T, 1, in]``, prompt after prompt.
    ``past[r]``: tokens of prompt ``r`` already in its slots (a chunk continuing them); none
    where omitted.
    """
    c = weights.config
    device = weights.device
    lengths = [len(p) for p in prompts]
    pasts = past if past is not None else [0] * len(prompts)
    if max(p + n for p, n in zip(pasts, lengths, strict=True)) > cache.capacity:
        raise ValueError(f"a prompt is longer than a slot ({cache.capacity} tokens)")
    total = sum(lengths)
    starts = list(itertools.accumulate(lengths, initial=0))[:-1]
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    positions = torch.cat(
        [torch.arange(p, p + n, device=device) for p, n in zip(pasts, lengths, strict=True)]
    )
    freqs = positions[:, None].float() * weights.inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    cos = angles.cos().to(weights.dtype)[:, None, :]  # [T, 1, head_dim]
    sin = angles.sin().to(weights.dtype)[:, None, :]

    # A chunk's queries see the cached tokens and, causally, their own.
    masks = [
        torch.arange(p + n, device=device) <= torch.arange(p, p + n, device=device)[:, None]
        if p
        else None
        for p, n in zip(pasts, lengths, strict=True)
    ]

    h = F.embedding(ids[:, None], weights.embed)  # [T, 1, hidden]
    for i, layer in enumerate(weights.layers):
        x = _rms_norm(h, layer.input_norm, c.rms_norm_eps)
        q = _linear(hooks, i, "q_proj", layer, x).view(total, c.num_attention_heads, c.head_dim)
        k = _linear(hooks, i, "k_proj", layer, x).view(total, c.num_key_value_heads, c.head_dim)
        v = _linear(hooks, i, "v_proj", layer, x).view(total, c.num_key_value_heads, c.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # Attention in the cache's dtype, as decode steps run it (core.hardware.kv_dtype).
        q, k, v = q.to(cache.dtype), k.to(cache.dtype), v.to(cache.dtype)
        ctx = torch.empty_like(q)
        for start, n, p, dsts, mask in zip(starts, lengths, pasts, slots, masks, strict=True):
            pk = k[start : start + n].transpose(0, 1)  # [kv_heads, n, head_dim]
            pv = v[start : start + n].transpose(0, 1)
            for slot in dsts:
                cache.keys[i][slot, :, p : p + n] = pk
                cache.values[i][slot, :, p : p + n] = pv
            gqa = c.kv_groups > 1
            if mask is not None:
                pk = cache.keys[i][dsts[0], :, : p + n]
                pv = cache.values[i][dsts[0], :, : p + n]
                if gqa:
                    # With a mask, CPU attention over grouped keys is 1.7x slower than over
                    # keys repeated per query head (SmolLM2, 1952 queries x 4000 keys: 524
                    # vs 303 ms a layer on 2 cores).
                    pk = pk.repeat_interleave(c.kv_groups, dim=0)
                    pv = pv.repeat_interleave(c.kv_groups, dim=0)
                    gqa = False
            out = F.scaled_dot_product_attention(
                q[start : start + n].transpose(0, 1)[None],
                pk[None],
                pv[None],
                attn_mask=mask,
                is_causal=mask is None and n > 1,
                scale=c.head_dim**-0.5,
                enable_gqa=gqa,
            )
            ctx[start : start + n] = out[0].transpose(0, 1)
        h = h + _linear(hooks, i, "o_proj", layer, ctx.view(total, 1, -1).to(weights.dtype))
        x = _rms_norm(h, layer.post_attention_norm, c.rms_norm_eps)
        gate = _linear(hooks, i, "gate_proj", layer, x)
        up = _linear(hooks, i, "up_proj", layer, x)
        h = h + _linear(hooks, i, "down_proj", layer, F.silu(gate) * up)
    last = torch.tensor([s + n - 1 for s, n in zip(starts, lengths, strict=True)], device=device)
    return _rms_norm(h[last, 0], weights.norm, c.rms_norm_eps)
