"""One decode step for sequences of different lengths, each in its own cache slot.

:func:`core.decoder.forward.forward` appends to a cache at one shared length; here every row
writes its new token's keys and values at its own column (its length) and attends to its own
columns only, so sequences admitted at different times decode in one batch. The arithmetic is
the forward's own (its norm, rotary and linear helpers), which is what keeps a sequence's
tokens equal to those of :func:`core.decoder.generate.greedy_generate` and transformers.
"""

from __future__ import annotations

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


def decode_step(
    weights: DecoderWeights,
    cache: SlotCache,
    slots: Tensor,
    tokens: Tensor,
    lengths: Tensor,
    hooks: LinearHooks = NO_HOOKS,
) -> Tensor:
    """Final hidden states ``[B, hidden]`` of ``tokens`` ``[B]``, one per sequence.

    ``slots`` ``[B]`` are the sequences' cache slots (distinct), ``lengths`` ``[B]`` how many
    tokens each slot holds: the new token's position, and the column its keys go to.
    """
    c = weights.config
    bsz = tokens.shape[0]
    if int(lengths.max()) >= cache.capacity:
        raise ValueError(f"a slot is full ({cache.capacity} tokens)")
    total = int(lengths.max()) + 1
    key_pos = torch.arange(total, device=tokens.device)
    mask = (key_pos[None, :] <= lengths[:, None])[:, None, None, :]  # [B, 1, 1, total]
    freqs = lengths[:, None].float() * weights.inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    cos = angles.cos().to(weights.dtype)[:, None, None, :]  # [B, 1, 1, head_dim]
    sin = angles.sin().to(weights.dtype)[:, None, None, :]
    # Each row's new keys go to row ``(slot · kv_heads + head) · capacity + length`` of a
    # layer's cache seen as ``[slots · kv_heads · capacity, head_dim]``: one index_copy_ per
    # layer with these rows, computed once per step, instead of an advanced-index assignment
    # (index_put_), which rebuilds and broadcasts its index tensors in every layer. Profiled
    # on SmolLM2 at 32 rows in bf16 (2 loaded cores): 11 -> 1.7 ms of the step's self time.
    heads_of = torch.arange(c.num_key_value_heads, device=tokens.device)
    slot_heads = slots[:, None] * c.num_key_value_heads + heads_of  # [B, kv_heads]
    kv_rows = (slot_heads * cache.capacity + lengths[:, None]).view(-1)
    # Attention reads the slots' cached keys and values where they lie: a plain slice of the
    # slot range the rows cover, holes included (a slot freed a step ago and not yet reused),
    # with a query of zeros for each hole whose output is dropped. Gathering the rows' slots
    # instead copies every layer's keys and values in every step (SmolLM2 bf16, 32 rows of
    # 250 tokens: step + logits 143 ms on a slice vs 182 ms gathered, AMX CPU); a hole costs
    # one row of attention. Only slots far apart (span over twice the rows) are gathered.
    first, last = int(slots.min()), int(slots.max())
    span = last - first + 1
    rows = slots - first  # [B]: each row's place in the span
    in_place = span <= 2 * bsz and bool((rows[1:] > rows[:-1]).all())
    if in_place and span > bsz:
        # Holes may attend to column 0 only (all masked would give NaN), then are dropped.
        span_mask = torch.zeros(span, 1, 1, total, dtype=torch.bool, device=tokens.device)
        span_mask[:, :, :, 0] = True
        mask = span_mask.index_copy(0, rows, mask)

    def attend(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """``q`` ``[B, heads, 1, head_dim]`` over the rows' cached keys and values."""
        if in_place:
            keys, values = keys[first : last + 1, :, :total], values[first : last + 1, :, :total]
            if span > bsz:
                q = q.new_zeros(span, *q.shape[1:]).index_copy(0, rows, q)
        else:
            keys = keys[:, :, :total].index_select(0, slots)
            values = values[:, :, :total].index_select(0, slots)
        ctx = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask,
            scale=c.head_dim**-0.5,
            enable_gqa=c.kv_groups > 1,
        )
        return ctx.index_select(0, rows) if in_place and span > bsz else ctx

    h = F.embedding(tokens[:, None], weights.embed)  # [B, 1, hidden]
    for i, layer in enumerate(weights.layers):
        x = _rms_norm(h, layer.input_norm, c.rms_norm_eps)

        def heads(t: Tensor, n: int) -> Tensor:
            return t.view(bsz, 1, n, c.head_dim).transpose(1, 2)  # [B, n, 1, head_dim]

        q = heads(_linear(hooks, i, "q_proj", layer, x), c.num_attention_heads)
        k = heads(_linear(hooks, i, "k_proj", layer, x), c.num_key_value_heads)
        v = heads(_linear(hooks, i, "v_proj", layer, x), c.num_key_value_heads)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # Attention runs in the cache's dtype (fp32 under bf16 weights on a CPU without AMX).
        k, v = k.reshape(-1, c.head_dim).to(cache.dtype), v.reshape(-1, c.head_dim).to(cache.dtype)
        cache.keys[i].view(-1, c.head_dim).index_copy_(0, kv_rows, k)
        cache.values[i].view(-1, c.head_dim).index_copy_(0, kv_rows, v)
        ctx = attend(q.to(cache.dtype), cache.keys[i], cache.values[i]).to(weights.dtype)
        ctx = ctx.transpose(1, 2).reshape(bsz, 1, c.num_attention_heads * c.head_dim)
        h = h + _linear(hooks, i, "o_proj", layer, ctx)
        x = _rms_norm(h, layer.post_attention_norm, c.rms_norm_eps)
        gate = _linear(hooks, i, "gate_proj", layer, x)
        up = _linear(hooks, i, "up_proj", layer, x)
        h = h + _linear(hooks, i, "down_proj", layer, F.silu(gate) * up)
    return _rms_norm(h, weights.norm, c.rms_norm_eps)[:, 0]
