"""Greedy decoding with the KV cache: one prefill, then one token per step."""

from __future__ import annotations

import torch
from torch import Tensor

from core.decoder.forward import (
    NO_HOOKS,
    DecoderWeights,
    KVCache,
    LinearHooks,
    forward,
    left_pad,
    logits,
)


@torch.inference_mode()
def greedy_generate(
    weights: DecoderWeights,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_token_ids: tuple[int, ...] = (),
    *,
    hooks: LinearHooks = NO_HOOKS,
) -> list[list[int]]:
    """Each prompt's continuation (at most ``max_new_tokens``, the stop token not included)."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    ids, mask = left_pad(prompts)
    ids, mask = ids.to(weights.device), mask.to(weights.device)
    bsz, prompt_len = ids.shape
    if prompt_len + max_new_tokens > weights.config.max_position_embeddings:
        raise ValueError(
            f"{prompt_len} prompt tokens + {max_new_tokens} new ones exceed the model's "
            f"{weights.config.max_position_embeddings} positions"
        )
    cache = KVCache.allocate(weights, bsz, prompt_len + max_new_tokens)
    # No padding in the batch: no mask, so attention takes SDPA's causal fast path.
    step_mask = None if bool(mask.all()) else mask
    hidden = forward(weights, ids, step_mask, hooks=hooks, cache=cache)
    stops = torch.tensor(stop_token_ids or [-1], device=weights.device)
    done = torch.zeros(bsz, dtype=torch.bool, device=weights.device)
    out: list[Tensor] = []
    for step in range(max_new_tokens):
        token = logits(weights, hidden[:, -1]).argmax(-1)  # [B]
        done |= torch.isin(token, stops)
        out.append(torch.where(done, -1, token))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if step_mask is not None:
            step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
        hidden = forward(weights, token[:, None], step_mask, hooks=hooks, cache=cache)
    tokens = torch.stack(out, dim=1).tolist()
    return [[t for t in row if t >= 0] for row in tokens]
