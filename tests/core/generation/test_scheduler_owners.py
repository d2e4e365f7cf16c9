"""Owners (tenants) in the scheduler: queues of their own, fewest-held first, reserved slots."""

from __future__ import annotations

import pytest
import torch

from core.decoder.base import DecoderBase
from core.generation.gathered import GatheredPairs
from core.generation.scheduler import GenerationRequest, QueueFull
from tests.core.decoder.test_forward import random_rows
from tests.core.generation.helpers import greedy, random_lora, run_all, scheduler


def _rows(base: DecoderBase, count: int, seed: int) -> list[list[int]]:
    return random_rows(base.config.vocab_size, [6] * count, seed=seed)


def test_a_flooding_owner_leaves_the_reserved_slot_to_another(tiny_decoder: DecoderBase) -> None:
    rows = _rows(tiny_decoder, 6, seed=40)
    sched = scheduler(tiny_decoder, num_slots=4, reserved_slots=1, stop_token_ids=())
    for row in rows[:5]:
        sched.add(GenerationRequest(row, greedy(40), owner="a"))
    sched.step()
    assert sched.running == 3 and sched.waiting == 2 and sched.free_slots == 1
    sched.step()  # the free slot stays free: "a" holds its whole share
    assert sched.running == 3 and sched.waiting == 2
    late = sched.add(GenerationRequest(rows[5], greedy(5), owner="b"))
    events = sched.step()
    # "b" gets its first token in the very next step, while "a"'s requests still wait.
    assert [len(e.token_ids) for e in events if e.request_id == late] == [1]
    assert sched.running == 4 and sched.waiting == 2
    tokens = list(events[[e.request_id for e in events].index(late)].token_ids)
    while any(e.request_id == late and e.finish_reason for e in events) is False:
        events = sched.step()
        tokens += [t for e in events if e.request_id == late for t in e.token_ids]
    # Fairness decides when a request runs, never what it generates.
    (alone,), out = run_all(
        scheduler(tiny_decoder, stop_token_ids=()), [GenerationRequest(rows[5], greedy(5))]
    )
    assert tokens == out.tokens[(alone, 0)]


def test_two_flooding_owners_leave_the_reserved_slot_to_a_third(
    tiny_decoder: DecoderBase,
) -> None:
    """The reserve is the last free slots, not a cap on each owner's count: "a" and "b" hold
    2 and 1 of 4 slots, each under a cap of 3, and still neither takes the fourth."""
    rows = _rows(tiny_decoder, 7, seed=44)
    sched = scheduler(tiny_decoder, num_slots=4, reserved_slots=1, stop_token_ids=())
    for owner, row in zip("ababab", rows, strict=False):
        sched.add(GenerationRequest(row, greedy(40), owner=owner))
    sched.step()
    assert sched.running == 3 and sched.waiting == 3 and sched.free_slots == 1
    sched.step()
    assert sched.running == 3 and sched.free_slots == 1
    late = sched.add(GenerationRequest(rows[6], greedy(5), owner="c"))
    events = sched.step()
    assert [len(e.token_ids) for e in events if e.request_id == late] == [1]
    assert sched.running == 4 and sched.waiting == 3


def test_a_freed_slot_goes_to_the_owner_holding_fewest(tiny_decoder: DecoderBase) -> None:
    rows = _rows(tiny_decoder, 7, seed=41)
    sched = scheduler(tiny_decoder, num_slots=3, stop_token_ids=())
    running = [sched.add(GenerationRequest(r, greedy(40), owner="a")) for r in rows[:3]]
    sched.step()
    queued_a = [sched.add(GenerationRequest(r, greedy(40), owner="a")) for r in rows[3:5]]
    queued_b = [sched.add(GenerationRequest(r, greedy(40), owner="b")) for r in rows[5:7]]
    sched.step()
    assert sched.waiting == 4
    # "a"'s queued requests are older, but "b" holds nothing: the freed slot is "b"'s.
    sched.cancel(running[0])
    assert {e.request_id for e in sched.step()} == {*running[1:], queued_b[0]}
    # Now each holds 1 once another of "a"'s is cancelled: the oldest request goes first.
    sched.cancel(running[1])
    assert {e.request_id for e in sched.step()} == {running[2], queued_b[0], queued_a[0]}
    assert sched.waiting == 2


def test_waiting_requests_are_bounded_per_owner(tiny_decoder: DecoderBase) -> None:
    rows = _rows(tiny_decoder, 3, seed=42)
    sched = scheduler(tiny_decoder, num_slots=1, max_waiting=1)
    sched.add(GenerationRequest(rows[0], greedy(3), owner="a"))
    with pytest.raises(QueueFull, match="1 of its owner's requests"):
        sched.add(GenerationRequest(rows[1], greedy(3), owner="a"))
    sched.add(GenerationRequest(rows[2], greedy(3), owner="b"))  # another owner's queue
    assert sched.waiting == 2


def test_an_owner_holding_nothing_may_take_the_reserve(tiny_decoder: DecoderBase) -> None:
    """The reserve bounds an owner that holds slots; a request with more candidates than the
    share still runs on an idle server, or it never could."""
    (row,) = _rows(tiny_decoder, 1, seed=43)
    sched = scheduler(tiny_decoder, num_slots=4, reserved_slots=1)
    (rid,), out = run_all(sched, [GenerationRequest(row, greedy(4, n=4), owner="a")])
    assert {index for request, index in out.tokens if request == rid} == {0, 1, 2, 3}


def test_reserved_slots_must_leave_a_share(tiny_decoder: DecoderBase) -> None:
    with pytest.raises(ValueError, match="reserved_slots"):
        scheduler(tiny_decoder, num_slots=2, reserved_slots=2)


def test_a_failed_prefill_gives_its_owners_slots_back(
    tiny_decoder: DecoderBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefill that raises fails the step's requests, a chunking one's and a whole one's,
    and each owner holds nothing after it: "a" may then take the reserve again, as an owner
    holding nothing may, with a request of every slot's candidates."""
    long, short, again = random_rows(tiny_decoder.config.vocab_size, [40, 6, 6], seed=45)
    sched = scheduler(tiny_decoder, num_slots=4, reserved_slots=1, prefill_tokens_per_step=16)
    sched.add(GenerationRequest(short, greedy(4), owner="b"))
    sched.add(GenerationRequest(long, greedy(4, n=2), owner="a"))

    # No real input makes the tiny Llama's prefill raise: torch's attention is replaced.
    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("attention failed")

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", broken)
        events = sched.step()  # "b"'s prompt and the first chunk of "a"'s, in one pass
    assert sorted((e.index, e.error) for e in events) == [(0, "attention failed")] * 2 + [
        (1, "attention failed")
    ]
    assert (sched.running, sched.free_slots, sched._held) == (0, 4, {})
    (rid,), out = run_all(sched, [GenerationRequest(again, greedy(3, n=4), owner="a")])
    assert sorted(index for request, index in out.tokens if request == rid) == [0, 1, 2, 3]


def test_a_decode_step_whose_adapters_cannot_be_copied_fails_its_sequences(
    tiny_decoder: DecoderBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copying the running adapters' pairs is part of the decode step: when it raises (out of
    memory, say), the step's sequences end with the error and give their slots back, rather
    than the step raising out of the scheduler with their first tokens undelivered; the next
    request runs."""
    one, two = (random_lora(tiny_decoder, key, 2, seed=i) for i, key in enumerate("xy"))
    first, second = random_rows(tiny_decoder.config.vocab_size, [6, 7], seed=46)
    sched = scheduler(tiny_decoder, num_slots=2)
    sched.add(GenerationRequest(first, greedy(4), one))
    sched.add(GenerationRequest(second, greedy(4), two))
    prefilled = sched.step()  # both prompts in one pass, their first tokens
    assert [e.error for e in prefilled] == [None, None]

    def no_memory(*args: object, **kwargs: object) -> None:
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    with monkeypatch.context() as patch:
        patch.setattr(GatheredPairs, "_copy_in", no_memory)
        failed = sched.step()  # two adapters: no merged copy, the pairs must be gathered
    assert sorted(e.error or "" for e in failed) == ["DefaultCPUAllocator: not enough memory"] * 2
    assert (sched.running, sched.free_slots) == (0, 2)
    (rid,), out = run_all(sched, [GenerationRequest(first, greedy(3), one)])
    assert len(out.tokens[(rid, 0)]) == 3
