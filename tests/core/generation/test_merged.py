"""Merged decode steps: one adapter's weights merged into the base while it runs alone."""

from __future__ import annotations

import pytest
import torch

from core.decoder.base import DecoderBase
from core.generation.adapters import LoraWeights
from core.generation.merged import merged_bytes
from core.generation.sampling import SamplingParams
from core.generation.scheduler import MERGE_PAYS_AFTER, GenerationRequest, MergeMode, Scheduler
from tests.core.decoder.test_forward import random_rows
from tests.core.generation.helpers import (
    Outputs,
    chat_prompts,
    greedy,
    random_lora,
    run_all,
    scheduler,
)
from tests.core.generation.test_scheduler import hf_greedy


def _sched(base: DecoderBase, **kw: int) -> Scheduler:
    return scheduler(base, capacity=256, stop_token_ids=(), **kw)


def _greedy_lp(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=True)


@pytest.fixture(scope="module")
def adapter(tiny_decoder: DecoderBase) -> LoraWeights:
    return random_lora(tiny_decoder, "all-r4", 4, seed=1)


def test_merged_steps_generate_what_per_row_deltas_do(
    tiny_decoder: DecoderBase, adapter: LoraWeights
) -> None:
    prompts = random_rows(tiny_decoder.config.vocab_size, [9, 17], seed=31)

    def run(mode: MergeMode) -> tuple[Scheduler, Outputs, list[int]]:
        sched = _sched(tiny_decoder)
        requests = [GenerationRequest(p, _greedy_lp(24), adapter, mode) for p in prompts]
        ids, out = run_all(sched, requests)
        return sched, out, ids

    merged_sched, merged, m_ids = run("merged")
    hooked_sched, hooked, h_ids = run("unmerged")
    # Both prompts share the first step's prefill, then 23 decode steps, all merged.
    for sched, counts in ((merged_sched, (1, 0, 23)), (hooked_sched, (0, 23, 0))):
        assert (sched.merges, sched.unmerged_steps, sched.merged_steps) == counts
    assert merged_sched.merge_seconds > 0 and hooked_sched.merge_seconds == 0
    assert merged_sched.merged_copy_bytes == merged_bytes(tiny_decoder.weights, adapter)
    assert hooked_sched.merged_copy_bytes == 0
    for m, h in zip(m_ids, h_ids, strict=True):
        assert merged.tokens[(m, 0)] == hooked.tokens[(h, 0)]
        m_lps = [lp.logprob for e in merged.events if e.request_id == m for lp in e.logprobs]
        h_lps = [lp.logprob for e in hooked.events if e.request_id == h for lp in e.logprobs]
        assert m_lps == pytest.approx(h_lps, abs=1e-4)
    # The adapter matters: the bare base continues differently.
    (bare_id,), bare = run_all(_sched(tiny_decoder), [GenerationRequest(prompts[0], greedy(24))])
    assert bare.tokens[(bare_id, 0)] != merged.tokens[(m_ids[0], 0)]


@pytest.mark.parametrize(
    ("modes", "max_tokens", "merged_bytes", "merges"),
    [
        (("auto",), MERGE_PAYS_AFTER + 1, 512 << 20, 1),  # one adapter, enough steps left
        (("auto",), 16, 512 << 20, 0),  # too few tokens left to pay for a merge
        (("merged",), 16, 512 << 20, 1),  # asked for: merged however short
        (("merged", "auto"), 16, 512 << 20, 1),  # one asks, the other allows it
        (("merged", "unmerged"), 16, 512 << 20, 0),  # one refuses: the step keeps the deltas
        (("merged",), 16, 0, 0),  # the server allows no merged copy
    ],
)
def test_when_a_step_merges(
    tiny_decoder: DecoderBase,
    adapter: LoraWeights,
    modes: tuple[MergeMode, ...],
    max_tokens: int,
    merged_bytes: int,
    merges: int,
) -> None:
    prompts = random_rows(tiny_decoder.config.vocab_size, [8] * len(modes), seed=32)
    sched = _sched(tiny_decoder, merged_bytes=merged_bytes)
    run_all(
        sched,
        [
            GenerationRequest(p, greedy(max_tokens), adapter, m)
            for p, m in zip(prompts, modes, strict=True)
        ],
    )
    assert sched.merges == merges
    assert sched.merged_steps == (max_tokens - 1 if merges else 0)


def test_a_step_of_several_adapters_or_the_base_never_merges(
    tiny_decoder: DecoderBase, adapter: LoraWeights
) -> None:
    other = random_lora(tiny_decoder, "mlp-r2", 2, ("gate_proj", "up_proj"), seed=3)
    prompts = random_rows(tiny_decoder.config.vocab_size, [8, 8], seed=33)
    for which in ([adapter, other], [adapter, None]):
        sched = _sched(tiny_decoder)
        requests = [
            GenerationRequest(p, greedy(16), a, "merged")
            for p, a in zip(prompts, which, strict=True)
        ]
        run_all(sched, requests)
        assert (sched.merges, sched.merged_steps) == (0, 0)


def test_a_prefill_of_the_copys_adapter_alone_runs_on_the_copy(
    tiny_decoder: DecoderBase, adapter: LoraWeights
) -> None:
    other = random_lora(tiny_decoder, "mlp-r2", 2, ("gate_proj", "up_proj"), seed=3)
    first, prompt, second = random_rows(tiny_decoder.config.vocab_size, [9, 13, 11], seed=37)
    (hooked_id,), hooked = run_all(
        _sched(tiny_decoder), [GenerationRequest(prompt, _greedy_lp(8), adapter, "unmerged")]
    )
    sched = _sched(tiny_decoder)
    # The copy is built at the first decode step, after that request's prefill.
    run_all(sched, [GenerationRequest(first, greedy(4), adapter, "merged")])
    assert (sched.merges, sched.merged_prefills) == (1, 0)
    (rid,), out = run_all(sched, [GenerationRequest(prompt, _greedy_lp(8), adapter)])
    # Prefilled on the copy (its first token too), then 7 merged decode steps: the tokens
    # and log-probabilities of the per-row deltas, up to rounding.
    assert (sched.merges, sched.merged_prefills, sched.merged_steps) == (1, 1, 3 + 7)
    assert out.tokens[(rid, 0)] == hooked.tokens[(hooked_id, 0)]
    lps = [lp.logprob for e in out.events for lp in e.logprobs]
    hooked_lps = [lp.logprob for e in hooked.events for lp in e.logprobs]
    assert lps == pytest.approx(hooked_lps, abs=1e-4)
    # A pass the copy's adapter does not have alone, or a prompt that refuses merged
    # weights, keeps the deltas; the copy itself stays.
    for pair in ((adapter, None), (adapter, other), (other, other)):
        run_all(
            sched,
            [
                GenerationRequest(p, greedy(2), a)
                for p, a in zip((prompt, second), pair, strict=True)
            ],
        )
    run_all(sched, [GenerationRequest(prompt, greedy(2), adapter, "unmerged")])
    assert (sched.merged_prefills, sched.merged_key) == (1, adapter.key)


def test_one_merged_copy_replaced_by_the_next_adapter_and_dropped_when_invalidated(
    tiny_decoder: DecoderBase, adapter: LoraWeights
) -> None:
    other = random_lora(tiny_decoder, "qv-r8", 8, ("q_proj", "v_proj"), seed=2)
    (prompt,) = random_rows(tiny_decoder.config.vocab_size, [8], seed=34)
    sched = _sched(tiny_decoder)
    run_all(sched, [GenerationRequest(prompt, greedy(4), adapter, "merged")])
    assert sched.merged_key == adapter.key  # kept for the adapter's next requests
    run_all(sched, [GenerationRequest(prompt, greedy(4), other, "merged")])
    assert (sched.merged_key, sched.merges) == (other.key, 2)
    # Invalidated mid-generation: the copy goes, and the sequence finishes with the
    # weights it started with through the bank, never merged again.
    (alone_id,), alone = run_all(
        _sched(tiny_decoder), [GenerationRequest(prompt, greedy(12), other, "unmerged")]
    )
    out = Outputs()
    rid = sched.add(GenerationRequest(prompt, greedy(12), other, "merged"))
    for _ in range(4):
        out.take(sched.step())
    steps = sched.merged_steps
    sched.invalidate_adapter(other.key)
    while sched.running:
        out.take(sched.step())
    assert sched.merged_key is None
    assert (sched.merges, sched.merged_steps) == (2, steps)
    assert out.tokens[(rid, 0)] == alone.tokens[(alone_id, 0)]


def test_a_copy_over_the_budget_falls_back_to_the_deltas_and_serving_goes_on(
    tiny_decoder: DecoderBase, adapter: LoraWeights
) -> None:
    small = random_lora(tiny_decoder, "qv-r8", 8, ("q_proj", "v_proj"), seed=2)
    budget = merged_bytes(tiny_decoder.weights, adapter) - 1  # one byte short of the copy
    assert merged_bytes(tiny_decoder.weights, small) <= budget
    prompts = random_rows(tiny_decoder.config.vocab_size, [9, 13], seed=35)
    (unmerged_id,), unmerged = run_all(
        _sched(tiny_decoder), [GenerationRequest(prompts[0], greedy(20), adapter, "unmerged")]
    )
    sched = _sched(tiny_decoder, merged_bytes=budget)
    (rid,), out = run_all(sched, [GenerationRequest(prompts[0], greedy(20), adapter, "merged")])
    # Asked for merged, refused by the budget at every one of its 19 decode steps: the
    # per-row deltas generate what the unmerged path does, and no copy is held.
    assert (sched.merges, sched.merged_steps, sched.merged_key) == (0, 0, None)
    assert out.tokens[(rid, 0)] == unmerged.tokens[(unmerged_id, 0)]
    assert out.finish[(rid, 0)] == "length" and sched.free_slots == 8
    # The same scheduler goes on: an adapter whose copy fits merges, and the big one's next
    # requests (two at once) still run on the deltas.
    run_all(sched, [GenerationRequest(prompts[1], greedy(20), small, "merged")])
    assert (sched.merges, sched.merged_steps, sched.merged_key) == (1, 19, small.key)
    ids, again = run_all(
        sched, [GenerationRequest(p, greedy(20), adapter, "merged") for p in prompts]
    )
    assert (sched.merges, sched.merged_steps) == (1, 19)
    assert again.tokens[(ids[0], 0)] == unmerged.tokens[(unmerged_id, 0)]
    assert len(again.tokens[(ids[1], 0)]) == 20


def test_a_merge_that_runs_out_of_memory_falls_back_once_and_serving_goes_on(
    tiny_decoder: DecoderBase, adapter: LoraWeights, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No real allocation of the tiny Llama's copy fails, so torch's own CPU out-of-memory
    # error is raised where the copy is allocated (torch, not loraplex code, is replaced).
    attempts = []

    def no_memory(*args: object, **kwargs: object) -> torch.Tensor:
        attempts.append(1)
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    (prompt,) = random_rows(tiny_decoder.config.vocab_size, [9], seed=36)
    (unmerged_id,), unmerged = run_all(
        _sched(tiny_decoder), [GenerationRequest(prompt, greedy(20), adapter, "unmerged")]
    )
    sched = _sched(tiny_decoder)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "addmm", no_memory)
        (rid,), out = run_all(sched, [GenerationRequest(prompt, greedy(20), adapter, "merged")])
    # Tried at the first decode step only: its sequence is never offered a merge again.
    assert (len(attempts), sched.merges, sched.merged_steps, sched.merged_key) == (1, 0, 0, None)
    assert out.tokens[(rid, 0)] == unmerged.tokens[(unmerged_id, 0)]
    # Memory back, the adapter's next request merges on the same scheduler, same tokens.
    (rid,), out = run_all(sched, [GenerationRequest(prompt, greedy(20), adapter, "merged")])
    assert (sched.merges, sched.merged_steps, sched.merged_key) == (1, 19, adapter.key)
    assert out.tokens[(rid, 0)] == unmerged.tokens[(unmerged_id, 0)]


@pytest.mark.real_model
def test_smollm2_merged_steps_equal_hf_generate(real_decoder: DecoderBase) -> None:
    (prompt,) = chat_prompts(real_decoder, "What is the capital of France?")
    adapter = random_lora(real_decoder, "smol-r8", 8, std=0.02)
    sched = scheduler(real_decoder, num_slots=1, capacity=256)
    (rid,), out = run_all(sched, [GenerationRequest(prompt, greedy(10), adapter, "merged")])
    assert sched.merges == 1 and sched.merged_steps > 0
    assert out.tokens[(rid, 0)] == hf_greedy(real_decoder, adapter, prompt, 10)
