"""Prefix caching: prompts starting with cached blocks prefill only the rest, to the same tokens."""

from __future__ import annotations

import pytest
import torch

from core.decoder.base import DecoderBase
from core.generation.kv import SlotCache, bytes_per_slot
from core.generation.prefill import prefill
from core.generation.prefix import BLOCK_TOKENS, PrefixCache
from core.generation.scheduler import GenerationRequest
from tests.core.decoder.test_forward import random_rows
from tests.core.generation.helpers import Outputs, greedy, random_lora, run_all, scheduler

BASE = ("tenant", None)


def pool(base: DecoderBase, blocks: int) -> PrefixCache:
    return PrefixCache(base.config, blocks, base.weights.dtype, base.weights.device)


def filled(base: DecoderBase, prompt: list[int]) -> SlotCache:
    """A two-slot cache with ``prompt``'s keys and values in slot 0."""
    cache = SlotCache(base.weights, 2, 128)
    with torch.inference_mode():
        prefill(base.weights, cache, [prompt], [[0]])
    return cache


def stored(base: DecoderBase, length: int, seed: int) -> tuple[list[int], SlotCache, PrefixCache]:
    """A random prompt of ``length`` tokens, a cache holding it in slot 0, and a prefix cache
    of 16 blocks that stored it."""
    (prompt,) = random_rows(base.config.vocab_size, [length], seed=seed)
    cache = filled(base, prompt)
    prefixes = pool(base, 16)
    prefixes.store(BASE, prompt, cache, 0)
    return prompt, cache, prefixes


def test_a_stored_prefix_is_found_whole_blocks_at_a_time_leaving_the_last_token(
    tiny_decoder: DecoderBase,
) -> None:
    prompt, _, prefixes = stored(tiny_decoder, 3 * BLOCK_TOKENS + 2, seed=40)
    assert prefixes.used == 3  # the 2 tokens past the last whole block are not kept
    assert len(prefixes.lookup(BASE, prompt)) == 3
    # A prompt that is exactly the cached blocks leaves its last block to prefill.
    assert len(prefixes.lookup(BASE, prompt[: 3 * BLOCK_TOKENS])) == 2
    assert len(prefixes.lookup(BASE, prompt[: 3 * BLOCK_TOKENS + 1])) == 3
    # Another owner, or an adapter, sees none of it.
    assert prefixes.lookup(("other", None), prompt) == []
    assert prefixes.lookup(("tenant", "adapter"), prompt) == []
    # A block is found only behind the prefix it followed.
    changed = [prompt[0] ^ 1, *prompt[1:]]
    assert prefixes.lookup(BASE, changed) == []
    diverging = prompt[:BLOCK_TOKENS] + [t ^ 1 for t in prompt[BLOCK_TOKENS:]]
    assert len(prefixes.lookup(BASE, diverging)) == 1


def test_loading_copies_the_prefix_keys_and_values_into_every_slot(
    tiny_decoder: DecoderBase,
) -> None:
    prompt, cache, prefixes = stored(tiny_decoder, 2 * BLOCK_TOKENS + 5, seed=41)
    target = SlotCache(tiny_decoder.weights, 3, 128)
    n = prefixes.load(prefixes.lookup(BASE, prompt), target, [1, 2])
    assert n == 2 * BLOCK_TOKENS and prefixes.hit_tokens == n
    for layer in range(len(tiny_decoder.weights.layers)):
        for slot in (1, 2):
            assert torch.equal(target.keys[layer][slot, :, :n], cache.keys[layer][0, :, :n])
            assert torch.equal(target.values[layer][slot, :, :n], cache.values[layer][0, :, :n])
        assert not target.keys[layer][0].any()  # slot 0 untouched


def test_the_least_recently_used_blocks_go_first_and_a_prefix_outlives_its_tail(
    tiny_decoder: DecoderBase,
) -> None:
    first, second = random_rows(tiny_decoder.config.vocab_size, [4 * BLOCK_TOKENS] * 2, seed=42)
    prefixes = pool(tiny_decoder, 5)
    prefixes.store(BASE, first, filled(tiny_decoder, first), 0)
    assert prefixes.used == 4
    # Two new blocks need one eviction: the first prompt's last block, not its first.
    prefixes.store(BASE, second[: 2 * BLOCK_TOKENS], filled(tiny_decoder, second), 0)
    assert len(prefixes.lookup(BASE, [*first, 0])) == 3
    assert len(prefixes.lookup(BASE, [*second, 0])) == 2
    # A prefix longer than the whole pool keeps what fits, evicting the rest.
    (long,) = random_rows(tiny_decoder.config.vocab_size, [7 * BLOCK_TOKENS], seed=43)
    prefixes.store(BASE, long, filled(tiny_decoder, long), 0)
    assert len(prefixes.lookup(BASE, long)) == 5
    assert prefixes.lookup(BASE, [*first, 0]) == []


def test_a_store_whose_copy_fails_adds_no_block(tiny_decoder: DecoderBase) -> None:
    (prompt,) = random_rows(tiny_decoder.config.vocab_size, [2 * BLOCK_TOKENS], seed=50)
    cache = filled(tiny_decoder, prompt)
    prefixes = pool(tiny_decoder, 2)
    with pytest.raises(IndexError):
        prefixes.store(BASE, prompt, cache, 5)  # no such slot
    assert prefixes.used == 0 and prefixes.lookup(BASE, [*prompt, 0]) == []
    prefixes.store(BASE, prompt, cache, 0)  # its rows were given back
    assert len(prefixes.lookup(BASE, [*prompt, 0])) == 2


def test_invalidating_an_adapter_drops_its_blocks_only(tiny_decoder: DecoderBase) -> None:
    (prompt,) = random_rows(tiny_decoder.config.vocab_size, [2 * BLOCK_TOKENS + 1], seed=44)
    cache = filled(tiny_decoder, prompt)
    prefixes = pool(tiny_decoder, 8)
    prefixes.store(("tenant", "a"), prompt, cache, 0)
    prefixes.store(BASE, prompt, cache, 0)
    prefixes.invalidate("a")
    assert prefixes.lookup(("tenant", "a"), prompt) == []
    assert len(prefixes.lookup(BASE, prompt)) == 2
    assert prefixes.used == 2


def test_a_budget_holds_whole_blocks(tiny_decoder: DecoderBase) -> None:
    block = bytes_per_slot(tiny_decoder.config, BLOCK_TOKENS, torch.float32)
    device = tiny_decoder.weights.device
    made = PrefixCache.for_budget(tiny_decoder.config, 3 * block + 1, torch.float32, device)
    assert made is not None and made.capacity == 3 and made.num_bytes == 3 * block
    assert PrefixCache.for_budget(tiny_decoder.config, block - 1, torch.float32, device) is None


def test_requests_after_a_shared_prefix_prefill_the_rest_to_the_same_tokens(
    tiny_decoder: DecoderBase,
) -> None:
    vocab = tiny_decoder.config.vocab_size
    (system,) = random_rows(vocab, [3 * BLOCK_TOKENS + 3], seed=45)
    tails = random_rows(vocab, [5, 2 * BLOCK_TOKENS, 1], seed=46)
    adapter = random_lora(tiny_decoder, "all-r4", 4, seed=3)
    requests = [
        GenerationRequest(system + tails[0], greedy(10)),
        GenerationRequest(system + tails[1], greedy(10, n=2), adapter),
        GenerationRequest(system + tails[2], greedy(10, n=2), adapter),
    ]
    ids, plain = run_all(scheduler(tiny_decoder), requests)
    sched = scheduler(tiny_decoder, prefix_cache_bytes=64 << 20)
    out = Outputs()
    cached = {}
    for request, rid in zip(requests, ids, strict=True):  # one after another
        new_id = sched.add(request)
        while sched.running or sched.waiting:
            out.take(sched.step())
        for j in range(request.params.n):
            assert out.tokens[(new_id, j)] == plain.tokens[(rid, j)]
        cached[new_id] = [e.cached_tokens for e in out.events if e.request_id == new_id]
    shared = 3 * BLOCK_TOKENS
    # The first of each adapter (or of the base) prefills its whole prompt; the second request
    # on the adapter finds the prefix the first stored, and both its candidates say so on
    # their first events.
    first, on_adapter, again = cached.values()
    assert first[0] == 0 and on_adapter[:2] == [0, 0]
    assert again[:2] == [shared, shared] and not any(again[2:])
    lengths = [len(r.prompt_ids) for r in requests]
    assert sched.prefill_tokens == sum(lengths) - shared
    assert sched.prefixes is not None and sched.prefixes.hit_tokens == shared


def test_the_next_turn_finds_the_previous_turn_and_its_reply_cached(
    tiny_decoder: DecoderBase,
) -> None:
    vocab = tiny_decoder.config.vocab_size
    # 17 + 15 - 1 tokens held: three whole blocks, where the 17 + 15 sampled would be four.
    (prompt, follow) = random_rows(vocab, [17, 6], seed=47)
    sched = scheduler(tiny_decoder, stop_token_ids=(), prefix_cache_bytes=64 << 20)
    (first,), out = run_all(sched, [GenerationRequest(prompt, greedy(15))])
    reply = out.tokens[(first, 0)]
    # The slot held the prompt and all but the last sampled token (never fed back).
    held = (len(prompt) + len(reply) - 1) // BLOCK_TOKENS * BLOCK_TOKENS
    turn = prompt + reply + follow
    (second,), next_turn = run_all(sched, [GenerationRequest(turn, greedy(8))])
    assert next_turn.events[0].cached_tokens == held
    (alone,), fresh = run_all(
        scheduler(tiny_decoder, stop_token_ids=()), [GenerationRequest(turn, greedy(8))]
    )
    assert next_turn.tokens[(second, 0)] == fresh.tokens[(alone, 0)]


def test_a_long_prompt_after_a_cached_prefix_is_chunked_from_it(tiny_decoder: DecoderBase) -> None:
    vocab = tiny_decoder.config.vocab_size
    (prompt,) = random_rows(vocab, [50], seed=48)
    sched = scheduler(tiny_decoder, prefill_tokens_per_step=16, prefix_cache_bytes=64 << 20)
    run_all(sched, [GenerationRequest(prompt[:20], greedy(1))])
    before = sched.prefill_tokens
    (rid,), out = run_all(sched, [GenerationRequest(prompt, greedy(6))])
    assert out.events[0].cached_tokens == 16
    assert sched.prefill_tokens - before == 50 - 16
    (alone,), fresh = run_all(scheduler(tiny_decoder), [GenerationRequest(prompt, greedy(6))])
    assert out.tokens[(rid, 0)] == fresh.tokens[(alone, 0)]


def test_an_invalidated_adapter_prefills_anew(tiny_decoder: DecoderBase) -> None:
    (prompt,) = random_rows(tiny_decoder.config.vocab_size, [30], seed=49)
    adapter = random_lora(tiny_decoder, "a", 4, seed=4)
    sched = scheduler(tiny_decoder, prefix_cache_bytes=64 << 20)
    request = GenerationRequest(prompt, greedy(3), adapter)
    run_all(sched, [request])
    _, hit = run_all(sched, [request])
    assert hit.events[0].cached_tokens == 24
    sched.invalidate_adapter("a")
    _, miss = run_all(sched, [request])
    assert miss.events[0].cached_tokens == 0
