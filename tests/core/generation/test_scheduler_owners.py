"""Owners (tenants) in the scheduler: queues of their own, fewest-held first, reserved slots."""

from __future__ import annotations

import pytest
import torch

from core.decoder.base import DecoderBase
from core.generation.gathered import GatheredPairs
from core.generation.sampling import SamplingParams
from core.generation.scheduler import GenerationRequest, QueueFull, Scheduler
from tests.core.decoder.test_forward import random_rows
from tests.core.generation.helpers import Outputs, greedy, random_lora, run_all, scheduler


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


def _starts(sched: Scheduler, rid: int, steps: int) -> tuple[dict[int, int], Outputs]:
    """Step ``steps`` times; the step (1-based) of each of ``rid``'s candidates' first token."""
    out, starts = Outputs(), {}
    for step in range(1, steps + 1):
        events = sched.step()
        out.take(events)
        for e in events:
            if e.request_id == rid and e.completion_tokens == 1:
                starts[e.index] = step
    return starts, out


def test_an_owner_with_nothing_running_starts_best_of_n_at_the_next_step(
    tiny_decoder: DecoderBase,
) -> None:
    """Best-of-4 from owner "b" does not wait for four free slots while "a" keeps the other
    six busy with long generations: two candidates start in the very next step, in the
    reserve, and the others as "b"'s own slots come free ("a" never finishes one meanwhile).
    Its prompt is prefilled once, and each candidate generates what it does when all four
    start together."""
    rows = _rows(tiny_decoder, 10, seed=47)
    adapter = random_lora(tiny_decoder, "b-chat", 4, seed=5)
    sched = scheduler(tiny_decoder, num_slots=8, reserved_slots=2, stop_token_ids=())
    for row in rows[:9]:  # six run, three more wait
        sched.add(GenerationRequest(row, greedy(100), owner="a"))
    sched.step()
    assert (sched.running, sched.free_slots, sched.waiting) == (6, 2, 3)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=1234, n=4)
    best_of = GenerationRequest(rows[9], params, adapter, owner="b")
    prefilled = sched.prefill_tokens
    rid = sched.add(best_of)
    starts, out = _starts(sched, rid, 18)
    # Two at once; when both end (6 tokens), one slot goes back to the reserve and the one
    # kept holds the third, and so on: "b" holding slots may not take the reserve either.
    assert starts == {0: 1, 1: 1, 2: 7, 3: 13}
    assert {out.finish[(rid, j)] for j in range(4)} == {"length"}
    assert sched.prefill_tokens == prefilled + len(rows[9])
    assert (sched.running, sched.waiting, sched._held) == (6, 3, {"a": 6})
    assert sched.adapters.pins("b-chat") == 0
    (alone,), together = run_all(scheduler(tiny_decoder, stop_token_ids=()), [best_of])
    for j in range(4):
        assert out.tokens[(rid, j)] == together.tokens[(alone, j)]
        assert out.text[(rid, j)] == together.text[(alone, j)]
    assert len({tuple(out.tokens[(rid, j)]) for j in range(4)}) == 4  # four draws


def test_candidates_waiting_to_start_take_freed_slots_by_the_fewest_held_rule(
    tiny_decoder: DecoderBase,
) -> None:
    """A request's candidates that have not started are its owner's head of the queue: a slot
    that frees goes to them if their owner holds fewest, before the other owner's requests."""
    rows = _rows(tiny_decoder, 6, seed=48)
    sched = scheduler(tiny_decoder, num_slots=4, stop_token_ids=())
    running = [sched.add(GenerationRequest(r, greedy(100), owner="a")) for r in rows[:3]]
    sched.step()
    queued_a = sched.add(GenerationRequest(rows[3], greedy(100), owner="a"))
    rid = sched.add(GenerationRequest(rows[4], greedy(100, n=3), owner="b"))
    events = sched.step()  # "b" takes the one free slot with its first candidate
    assert {(e.request_id, e.index) for e in events if e.completion_tokens == 1} == {(rid, 0)}
    sched.cancel(running[0])
    events = sched.step()  # "b" holds 1, "a" 2: the freed slot starts "b"'s second
    assert {(e.request_id, e.index) for e in events if e.completion_tokens == 1} == {(rid, 1)}
    sched.cancel(running[1])
    events = sched.step()  # 2 each: "a"'s request is the older
    assert {(e.request_id, e.index) for e in events if e.completion_tokens == 1} == {(queued_a, 0)}
    assert sched.waiting == 1


def test_cancelling_a_request_whose_candidates_wait_frees_every_slot(
    tiny_decoder: DecoderBase,
) -> None:
    """The last running candidate of a request whose others wait keeps its slot for them;
    cancelling the request frees it with the rest, and the adapter's pins go."""
    rows = _rows(tiny_decoder, 3, seed=49)
    adapter = random_lora(tiny_decoder, "b-chat", 4, seed=6)
    sched = scheduler(tiny_decoder, num_slots=4, reserved_slots=1, stop_token_ids=())
    running = [sched.add(GenerationRequest(r, greedy(100), owner="a")) for r in rows[:2]]
    sched.step()
    rid = sched.add(GenerationRequest(rows[2], greedy(2, n=4), adapter, owner="b"))
    sched.step()  # two candidates start (the reserve included)
    sched.step()  # both end: one slot back to the free ones, one kept for the third
    assert (sched.running, sched.free_slots, sched._held) == (2, 1, {"a": 2, "b": 1})
    assert sched.adapters.pins("b-chat") == 1
    sched.cancel(rid)
    events = sched.step()
    assert {e.request_id for e in events} == set(running)  # "a"'s sequences only
    assert (sched.running, sched.free_slots, sched.waiting, sched._held) == (2, 2, 0, {"a": 2})
    assert sched.adapters.pins("b-chat") == 0


def test_a_failed_prefill_fails_the_candidates_that_have_not_started_too(
    tiny_decoder: DecoderBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that found slots for some of its candidates fails whole when its prefill
    raises: the others' events carry the error as well, and it leaves the queue."""
    rows = _rows(tiny_decoder, 2, seed=50)
    sched = scheduler(tiny_decoder, num_slots=3)
    sched.add(GenerationRequest(rows[0], greedy(40), owner="a"))
    sched.step()
    rid = sched.add(GenerationRequest(rows[1], greedy(4, n=3), owner="b"))

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("attention failed")

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", broken)
        events = sched.step()  # "b"'s prompt in two slots; "a"'s decode step fails too
    assert sorted((e.request_id, e.index, e.error) for e in events if e.request_id == rid) == [
        (rid, j, "attention failed") for j in range(3)
    ]
    assert (sched.running, sched.waiting, sched.free_slots, sched._held) == (0, 0, 3, {})
