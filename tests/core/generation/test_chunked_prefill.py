"""Chunked prefill: a prompt longer than the step's token budget, a chunk per step."""

from __future__ import annotations

import torch

from core.decoder.base import DecoderBase
from core.generation.kv import SlotCache
from core.generation.prefill import prefill
from core.generation.sampling import SamplingParams
from core.generation.scheduler import GenerationRequest
from tests.core.decoder.test_forward import random_rows
from tests.core.generation.helpers import Outputs, greedy, random_lora, run_all, scheduler


@torch.inference_mode()
def test_prefill_continuing_from_cached_keys_equals_one_pass(tiny_decoder: DecoderBase) -> None:
    weights = tiny_decoder.weights
    prompt, other = random_rows(tiny_decoder.config.vocab_size, [37, 9], seed=21)
    whole = SlotCache(weights, 2, 64)
    expected = prefill(weights, whole, [prompt, other], [[0], [1]])
    chunked = SlotCache(weights, 2, 64)
    prefill(weights, chunked, [prompt[:16]], [[0]])
    # The next chunks packed with a fresh prompt, as a step packs them.
    prefill(weights, chunked, [prompt[16:30], other], [[0], [1]], past=[16, 0])
    last = prefill(weights, chunked, [prompt[30:]], [[0]], past=[30])
    torch.testing.assert_close(last[0], expected[0], rtol=1e-5, atol=1e-5)
    for i in range(len(weights.layers)):
        torch.testing.assert_close(chunked.keys[i][:, :, :37], whole.keys[i][:, :, :37])
        torch.testing.assert_close(chunked.values[i][:, :, :37], whole.values[i][:, :, :37])


def test_a_prompt_prefilled_in_chunks_generates_what_one_pass_does(
    tiny_decoder: DecoderBase,
) -> None:
    adapter = random_lora(tiny_decoder, "all-r4", 4, seed=1)
    prompt, short = random_rows(tiny_decoder.config.vocab_size, [45, 6], seed=22)
    requests = [
        GenerationRequest(prompt, greedy(12, n=2), adapter),
        GenerationRequest(short, greedy(12)),
    ]
    (long_id, short_id), whole = run_all(scheduler(tiny_decoder), requests)
    sched = scheduler(tiny_decoder, prefill_tokens_per_step=16)
    (c_long, c_short), chunked = run_all(sched, requests)
    assert sched.prefill_tokens == 45 + 6
    for j in range(2):
        assert chunked.tokens[(c_long, j)] == whole.tokens[(long_id, j)]
    assert chunked.tokens[(c_short, 0)] == whole.tokens[(short_id, 0)]


def test_running_sequences_decode_while_a_long_prompt_is_chunked(
    tiny_decoder: DecoderBase,
) -> None:
    rows = random_rows(tiny_decoder.config.vocab_size, [5, 7, 40, 3], seed=23)
    sched = scheduler(tiny_decoder, prefill_tokens_per_step=12, stop_token_ids=())
    out = Outputs()
    running = [sched.add(GenerationRequest(r, greedy(30))) for r in rows[:2]]
    out.take(sched.step())
    long_id = sched.add(GenerationRequest(rows[2], greedy(4)))
    after = sched.add(GenerationRequest(rows[3], greedy(4)))
    chunk_steps = 0
    while (long_id, 0) not in out.tokens:
        before = {rid: len(out.tokens[(rid, 0)]) for rid in running}
        out.take(sched.step())
        chunk_steps += 1
        # Every step of the chunking gave each running sequence its next token ...
        assert all(len(out.tokens[(rid, 0)]) == before[rid] + 1 for rid in running)
        # ... and never ran more than the budget of prompt tokens.
        assert sched.prefill_tokens <= 5 + 7 + 12 * chunk_steps
    # 40 tokens in chunks of 12: four steps, the last of which sampled its first token. The
    # request behind it waited while chunks took the whole budget, and joined the last chunk
    # (4 tokens) in that step's pass.
    assert chunk_steps == 4
    assert len(out.tokens[(after, 0)]) == 1
    assert sched.prefill_tokens == 5 + 7 + 40 + 3
    while sched.running or sched.waiting:
        out.take(sched.step())
    (alone_id,), alone = run_all(
        scheduler(tiny_decoder, stop_token_ids=()), [GenerationRequest(rows[2], greedy(4))]
    )
    assert out.tokens[(long_id, 0)] == alone.tokens[(alone_id, 0)]
    assert len(out.tokens[(after, 0)]) == 4


def test_cancelling_a_chunking_prompt_frees_its_slots(tiny_decoder: DecoderBase) -> None:
    (prompt,) = random_rows(tiny_decoder.config.vocab_size, [50], seed=24)
    adapter = random_lora(tiny_decoder, "all-r4", 4, seed=1)
    sched = scheduler(tiny_decoder, num_slots=3, prefill_tokens_per_step=16)
    rid = sched.add(GenerationRequest(prompt, greedy(4, n=2), adapter))
    assert sched.step() == []  # the first chunk: no token yet
    assert (sched.running, sched.free_slots, sched.adapters.pins(adapter.key)) == (2, 1, 2)
    sched.cancel(rid)
    assert sched.step() == []
    assert (sched.running, sched.free_slots, sched.adapters.pins(adapter.key)) == (0, 3, 0)
    assert sched.prefill_tokens == 16
    assert sched.cancelled_sequences == 2  # its candidates held slots, as running ones do


def test_candidates_waiting_for_slots_start_from_a_chunked_prompt(
    tiny_decoder: DecoderBase,
) -> None:
    """A long prompt's request that found one free slot for three candidates chunks its
    prompt in that slot; the other two start after it, one at a time in the slot its first
    one leaves, from its prompt (prefilled once) and with the weights of its adapter as it was
    when the request started, although the adapter was replaced meanwhile: each generates what
    it does when all three start together."""
    adapter = random_lora(tiny_decoder, "all-r4", 4, seed=1)
    *others, prompt = random_rows(tiny_decoder.config.vocab_size, [5, 7, 40], seed=25)
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=99, n=3)
    request = GenerationRequest(prompt, params, adapter)
    sched = scheduler(tiny_decoder, num_slots=3, prefill_tokens_per_step=16, stop_token_ids=())
    for row in others:
        sched.add(GenerationRequest(row, greedy(100)))
    sched.step()
    rid = sched.add(request)
    out = Outputs()
    for _ in range(3):  # 16 + 16 + 8 prompt tokens: candidate 0's first token
        out.take(sched.step())
    assert [key for key in out.tokens if key[0] == rid] == [(rid, 0)]
    sched.invalidate_adapter(adapter.key)
    while len(out.finish) < 3:
        out.take(sched.step())
    assert sched.prefill_tokens == 5 + 7 + len(prompt)
    # The replaced weights stayed pinned for them, and went with the last one.
    assert (sched.running, sched.waiting, sched.adapters._retired) == (2, 0, {})
    (alone,), together = run_all(scheduler(tiny_decoder, stop_token_ids=()), [request])
    assert [out.tokens[(rid, j)] for j in range(3)] == [
        together.tokens[(alone, j)] for j in range(3)
    ]
