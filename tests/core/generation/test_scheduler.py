"""The continuous-batching scheduler against transformers' ``generate`` and against itself."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.decoder.base import DecoderBase
from core.errors import ConfigError
from core.generation.adapters import LoraWeights
from core.generation.sampling import SamplingParams
from core.generation.scheduler import (
    NON_FINITE_OUTPUT,
    NOT_FINITE,
    ContextLengthError,
    GenerationRequest,
    QueueFull,
)
from tests.core.decoder.test_forward import hf_model, random_rows
from tests.core.generation.helpers import (
    Outputs,
    chat_prompts,
    greedy,
    merged,
    random_lora,
    run_all,
    scheduler,
)


def hf_greedy(
    base: DecoderBase, adapter: LoraWeights | None, prompt: list[int], max_new: int
) -> list[int]:
    """transformers' ``generate`` (do_sample=False) over the merged weights, stop id dropped."""
    model = hf_model(dataclasses.replace(base, state_dict=merged(base, adapter)))
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=list(base.stop_token_ids),
            pad_token_id=0,
        )
    new = out[0, len(prompt) :].tolist()
    for i, t in enumerate(new):
        if t in base.stop_token_ids:
            return new[:i]
    return new


@pytest.fixture(scope="module")
def adapters(tiny_decoder: DecoderBase) -> list[LoraWeights]:
    """Mixed ranks and target sets: all-linear r=4, q+v r=8 on layer 1 only, MLP r=2."""
    return [
        random_lora(tiny_decoder, "all-r4", 4, seed=1),
        random_lora(tiny_decoder, "qv-r8", 8, ("q_proj", "v_proj"), layers=[1], seed=2),
        random_lora(tiny_decoder, "mlp-r2", 2, ("gate_proj", "up_proj", "down_proj"), seed=3),
    ]


def test_mixed_batch_equals_hf_generate_with_merged_weights(
    tiny_decoder: DecoderBase, adapters: list[LoraWeights]
) -> None:
    prompts = random_rows(tiny_decoder.config.vocab_size, [9, 23, 4, 15], seed=5)
    which: list[LoraWeights | None] = [adapters[0], None, adapters[1], adapters[2]]
    requests = [GenerationRequest(p, greedy(20), a) for p, a in zip(prompts, which, strict=True)]
    ids, out = run_all(scheduler(tiny_decoder), requests)
    for rid, prompt, adapter in zip(ids, prompts, which, strict=True):
        assert out.tokens[(rid, 0)] == hf_greedy(tiny_decoder, adapter, prompt, 20)
    # The adapters matter: the all-linear one changes the bare base's continuation.
    assert hf_greedy(tiny_decoder, None, prompts[0], 20) != out.tokens[(ids[0], 0)]


def test_mixed_batch_equals_each_sequence_alone(
    tiny_decoder: DecoderBase, adapters: list[LoraWeights]
) -> None:
    prompts = random_rows(tiny_decoder.config.vocab_size, [7, 30, 12, 3, 18], seed=6)
    which: list[LoraWeights | None] = [adapters[1], adapters[0], None, adapters[2], adapters[1]]
    requests = [GenerationRequest(p, greedy(24), a) for p, a in zip(prompts, which, strict=True)]
    ids, together = run_all(scheduler(tiny_decoder), requests)
    for rid, request in zip(ids, requests, strict=True):
        (alone_id,), alone = run_all(scheduler(tiny_decoder), [request])
        assert together.tokens[(rid, 0)] == alone.tokens[(alone_id, 0)]
        assert together.text[(rid, 0)] == alone.text[(alone_id, 0)]


def test_sequences_joining_mid_flight_change_nothing(
    tiny_decoder: DecoderBase, adapters: list[LoraWeights]
) -> None:
    prompts = random_rows(tiny_decoder.config.vocab_size, [11, 5, 26], seed=7)
    long = GenerationRequest(prompts[0], greedy(40), adapters[0])
    (alone_id,), alone = run_all(scheduler(tiny_decoder), [long])
    sched = scheduler(tiny_decoder)
    out = Outputs()
    long_id = sched.add(long)
    for _ in range(6):
        out.take(sched.step())
    late = [
        sched.add(GenerationRequest(prompts[1], greedy(8), adapters[2])),
        sched.add(GenerationRequest(prompts[2], greedy(8))),
    ]
    out.take(sched.step())
    # The newcomers got their first token in the step that admitted them ...
    assert all(len(out.tokens[(rid, 0)]) == 1 for rid in late)
    assert sched.running == 3
    while sched.running:
        out.take(sched.step())
    # ... and the long sequence, decoding beside them since, is what it is alone.
    assert out.tokens[(long_id, 0)] == alone.tokens[(alone_id, 0)]
    # A short request admitted late finished before the long one.
    finished = [e.request_id for e in out.events if e.finish_reason is not None]
    assert finished.index(late[0]) < finished.index(long_id)


def test_prompts_of_different_lengths_prefilled_together_equal_each_alone(
    tiny_decoder: DecoderBase, adapters: list[LoraWeights]
) -> None:
    prompts = random_rows(tiny_decoder.config.vocab_size, [3, 31, 12, 1, 17], seed=12)
    which: list[LoraWeights | None] = [adapters[0], None, adapters[2], adapters[1], adapters[0]]
    requests = [
        GenerationRequest(p, greedy(16, n=2 if i == 2 else 1), a)
        for i, (p, a) in enumerate(zip(prompts, which, strict=True))
    ]
    sched = scheduler(tiny_decoder)
    ids = [sched.add(r) for r in requests]
    out = Outputs()
    out.take(sched.step())
    # One step admitted all five in one packed pass: each prompt counted once, all running.
    assert sched.prefill_tokens == sum(map(len, prompts))
    assert sched.running == 6
    while sched.running:
        out.take(sched.step())
    for rid, request in zip(ids, requests, strict=True):
        (alone_id,), alone = run_all(scheduler(tiny_decoder), [request])
        for j in range(request.params.n):
            assert out.tokens[(rid, j)] == alone.tokens[(alone_id, j)]
            assert out.text[(rid, j)] == alone.text[(alone_id, j)]


def test_prefill_budget_bounds_a_steps_prompt_tokens(tiny_decoder: DecoderBase) -> None:
    prompts = random_rows(tiny_decoder.config.vocab_size, [20, 4, 30, 20], seed=13)
    sched = scheduler(tiny_decoder, prefill_tokens_per_step=48)
    for p in prompts:
        sched.add(GenerationRequest(p, greedy(4)))
    sched.step()
    # 20 + 4 = 24 <= 48; with the 30 it would be 54.
    assert (sched.running, sched.waiting) == (2, 2)
    sched.step()
    # The next step: 30, and 30 + 20 = 50 > 48 leaves the last one waiting.
    assert (sched.running, sched.waiting) == (3, 1)


def test_n_candidates_share_one_prefill(tiny_decoder: DecoderBase) -> None:
    prompt = random_rows(tiny_decoder.config.vocab_size, [21], seed=8)[0]
    sched = scheduler(tiny_decoder)
    (rid,), out = run_all(sched, [GenerationRequest(prompt, greedy(12, n=3))])
    assert sched.prefill_tokens == len(prompt)  # once, not three times
    (one_id,), one = run_all(scheduler(tiny_decoder), [GenerationRequest(prompt, greedy(12))])
    # Greedy candidates decode from copies of one prompt cache: all equal the single one.
    assert [out.tokens[(rid, j)] for j in range(3)] == [one.tokens[(one_id, 0)]] * 3


def test_seed_gives_the_same_text_whatever_shares_the_batch(
    tiny_decoder: DecoderBase, adapters: list[LoraWeights]
) -> None:
    prompt = random_rows(tiny_decoder.config.vocab_size, [10], seed=9)[0]
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, n=2)
    request = GenerationRequest(prompt, params, adapters[2])
    (a_id,), alone = run_all(scheduler(tiny_decoder), [request])
    others = [
        GenerationRequest(p, SamplingParams(max_tokens=16, temperature=1.0, seed=s))
        for s, p in enumerate(random_rows(tiny_decoder.config.vocab_size, [5, 13], seed=10))
    ]
    (_, b_id, _), crowd = run_all(scheduler(tiny_decoder), [others[0], request, others[1]])
    for j in range(2):
        assert crowd.tokens[(b_id, j)] == alone.tokens[(a_id, j)]
    # The two candidates are two draws, not one draw twice.
    assert alone.tokens[(a_id, 0)] != alone.tokens[(a_id, 1)]


def test_cancel_frees_the_slot_at_the_next_step(tiny_decoder: DecoderBase) -> None:
    rows = random_rows(tiny_decoder.config.vocab_size, [6, 6, 6], seed=11)
    sched = scheduler(tiny_decoder, num_slots=2)
    running = sched.add(GenerationRequest(rows[0], greedy(50, n=2)))
    sched.step()
    assert sched.free_slots == 0
    queued = sched.add(GenerationRequest(rows[1], greedy(4)))
    dropped = sched.add(GenerationRequest(rows[2], greedy(4)))
    sched.step()
    assert sched.waiting == 2  # no slot for them yet
    sched.cancel(running)
    sched.cancel(dropped)  # still waiting: it leaves the queue
    events = sched.step()
    assert {e.request_id for e in events} == {queued}
    assert sched.running == 1 and sched.waiting == 0 and sched.free_slots == 1
    assert sched.cancelled_sequences == 2  # the running request's two candidates


def test_refusals_name_the_limit(tiny_decoder: DecoderBase) -> None:
    sched = scheduler(tiny_decoder, num_slots=2, capacity=32, max_waiting=1)
    with pytest.raises(ContextLengthError, match="maximum context length is 32 tokens"):
        sched.add(GenerationRequest([5] * 30, greedy(3)))
    with pytest.raises(ConfigError, match="n: at most 2"):
        sched.add(GenerationRequest([5], greedy(3, n=3)))
    with pytest.raises(ConfigError, match="prompt"):
        sched.add(GenerationRequest([tiny_decoder.config.vocab_size], greedy(3)))
    sched.add(GenerationRequest([5, 6], greedy(3)))
    with pytest.raises(QueueFull):
        sched.add(GenerationRequest([5, 6], greedy(3)))


def test_max_tokens_ends_with_length(tiny_decoder: DecoderBase) -> None:
    prompt = random_rows(tiny_decoder.config.vocab_size, [8], seed=12)[0]
    sched = scheduler(tiny_decoder, stop_token_ids=())
    (rid,), out = run_all(sched, [GenerationRequest(prompt, greedy(5))])
    assert out.finish[(rid, 0)] == "length"
    assert len(out.tokens[(rid, 0)]) == 5
    assert out.events[-1].completion_tokens == 5


def test_stop_string_ends_the_text_before_it(tiny_decoder: DecoderBase) -> None:
    prompt = random_rows(tiny_decoder.config.vocab_size, [8], seed=13)[0]
    sched = scheduler(tiny_decoder, stop_token_ids=())
    (rid,), full = run_all(sched, [GenerationRequest(prompt, greedy(30))])
    text = full.text[(rid, 0)]
    stop = text[6:9]
    assert len(stop) == 3
    (sid,), out = run_all(sched, [GenerationRequest(prompt, greedy(30, stop=("zzzz", stop)))])
    assert out.finish[(sid, 0)] == "stop"
    assert out.text[(sid, 0)] == text[: text.index(stop)]
    # No event ever carried a piece of the stop string past what is returned.
    assert "".join(e.text for e in out.events) == out.text[(sid, 0)]


def test_logprobs_cover_the_text_returned_not_the_stop_string(tiny_decoder: DecoderBase) -> None:
    # Each token's logprob was sent as the token came, also for the tokens of a stop string,
    # whose text is never returned: OpenAI's logprobs cover the text returned.
    prompt = random_rows(tiny_decoder.config.vocab_size, [8], seed=13)[0]
    sched = scheduler(tiny_decoder, stop_token_ids=())
    params = dataclasses.replace(greedy(30), logprobs=True)
    (rid,), full = run_all(sched, [GenerationRequest(prompt, params)])
    tokens, text = full.tokens[(rid, 0)], full.text[(rid, 0)]

    def decode(ids: list[int]) -> str:
        return str(tiny_decoder.tokenizer.decode(ids, clean_up_tokenization_spaces=False))

    # A stop string of three tokens' text, starting after the first few tokens, where their
    # text is whole (no character split across tokens before it).
    assert decode(tokens) == text
    k, start = next(
        (k, len(decode(tokens[:k])))
        for k in range(3, len(tokens) - 3)
        if text.startswith(decode(tokens[:k]))
        and text.index(text[len(decode(tokens[:k])) :][:3]) == len(decode(tokens[:k]))
    )
    stop = text[start : start + 3]
    request = GenerationRequest(prompt, dataclasses.replace(params, stop=(stop,)))
    (sid,), out = run_all(sched, [request])
    returned = out.text[(sid, 0)]
    assert out.finish[(sid, 0)] == "stop" and returned == text[: text.index(stop)]
    sent = [lp.token_id for e in out.events for lp in e.logprobs]
    assert returned == text[:start]
    assert sent == tokens[:k]  # not those of the stop string's text, nor later ones


@pytest.mark.real_model
def test_smollm2_greedy_equals_hf_generate(real_decoder: DecoderBase) -> None:
    prompts = chat_prompts(real_decoder, "What is the capital of France?", "Name a colour.")
    adapter = random_lora(real_decoder, "smol-r8", 8, ("q_proj", "v_proj", "down_proj"), std=0.02)
    which: list[LoraWeights | None] = [None, adapter]
    requests = [GenerationRequest(p, greedy(10), a) for p, a in zip(prompts, which, strict=True)]
    ids, out = run_all(scheduler(real_decoder, num_slots=2, capacity=256), requests)
    for rid, prompt, a in zip(ids, prompts, which, strict=True):
        assert out.tokens[(rid, 0)] == hf_greedy(real_decoder, a, prompt, 10)
    assert "Paris" in out.text[(ids[0], 0)]


def _nan_lora(base: DecoderBase) -> LoraWeights:
    lora = random_lora(base, "nan", 2, ("o_proj",), layers=[0], seed=9)
    ((site, (a, b)),) = lora.pairs.items()
    return LoraWeights("nan", {site: (a, torch.full_like(b, float("nan")))}, lora.scaling)


@pytest.mark.parametrize("when", ["prefill", "alone", "chunking", "decode"])
def test_scores_that_are_not_finite_fail_their_request_alone(
    tiny_decoder: DecoderBase, adapters: list[LoraWeights], when: str
) -> None:
    """An adapter whose weights overflow (NaN) fails its own request only, all its candidates,
    once each: torch.multinomial raised on its row, and every sequence of the pass failed with
    it. Prefilled with others, alone, beside another owner's prompt that starts chunking in
    the same pass, or going bad between its prompt and its next decode step."""
    prompts = random_rows(tiny_decoder.config.vocab_size, [9, 14, 12, 40], seed=8)
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=4)
    others = {
        "prefill": [
            GenerationRequest(prompts[0], greedy(12), owner="b"),
            GenerationRequest(prompts[1], sampled, adapters[0], mode="unmerged", owner="b"),
        ],
        "alone": [],
        "chunking": [GenerationRequest(prompts[3], sampled, adapters[0], owner="b")],
        "decode": [GenerationRequest(prompts[0], greedy(12), owner="b")],
    }[when]
    budget = 16 if when == "chunking" else 2048  # the long prompt starts in the bad one's pass
    alone_ids, alone = run_all(scheduler(tiny_decoder, prefill_tokens_per_step=budget), others)
    bad = adapters[2] if when == "decode" else _nan_lora(tiny_decoder)
    # Decode: 3 slots, one the other's, so the third candidate waits to start.
    num_slots = 3 if when == "decode" else 8
    sched = scheduler(
        tiny_decoder,
        num_slots=num_slots,
        prefill_tokens_per_step=budget,
        prefix_cache_bytes=1 << 20,
    )
    bad_request = GenerationRequest(prompts[2], dataclasses.replace(sampled, n=3), bad, owner="a")
    if when == "decode":
        ids = [sched.add(r) for r in others]
        bad_id = sched.add(bad_request)
    else:  # first: the long prompt starts chunking on what the bad one leaves of the budget
        bad_id = sched.add(bad_request)
        ids = [sched.add(r) for r in others]
    events = sched.step()  # the prompts prefilled together (the long one's first chunk)
    if when == "decode":  # the weights go bad after the prompt: the next decode step copies them
        slot = sched.adapters.acquire(bad)
        with torch.inference_mode():
            for b in (pair[1] for pair in sched.adapters.bank.site_tensors().values()):
                b[slot].fill_(float("nan"))
        sched.adapters.release(slot, bad.key)
    while sched.running or sched.waiting:
        events += sched.step()
    failed = [(e.request_id, e.index, e.error, e.error_code) for e in events if e.error]
    assert sorted(failed) == [(bad_id, i, NOT_FINITE, NON_FINITE_OUTPUT) for i in range(3)]
    together = Outputs()
    together.take([e for e in events if e.request_id != bad_id])
    assert [together.tokens[(i, 0)] for i in ids] == [alone.tokens[(i, 0)] for i in alone_ids]
    # Nothing of the failed request is left: slots, pins, parked candidates, cached prefixes.
    assert sched.free_slots == num_slots and not sched.adapters.pins(bad.key)
    assert not sched._rests and not sched._held and not sched.waiting
    assert sched.prefixes is not None
    cached = sched.prefixes.lookup(bad_request.scope, prompts[2])
    assert cached == [] if when != "decode" else cached  # (its prompt was finite then)
