"""The batcher on its own (real engine, tiny random base): when a batch waits for company,
and how rows of several tenants share batches and lanes."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Collection, Hashable, Sequence
from typing import Any

import pytest
import torch

from core.base import FrozenBase
from core.inference import InferenceEngine, Plan, Row, RowEncoder, RowResult
from core.inference.rows import ForwardMode
from service.serving.batcher import Batcher, QueueFullError
from service.serving.policy import AutoModePolicy
from tests.core.inference.helpers import lora, output

FOREVER_MS = 600_000.0  # a wait no test could sit through: reaching it fails the deadline
A = ("tenant-a", "cls", 1)  # adapter keys as the service makes them: (tenant_id, name, version)
B = ("tenant-b", "cls", 1)
C = ("tenant-c", "cls", 1)


def test_a_request_that_arrives_alone_runs_without_waiting_for_company(
    tiny_base: FrozenBase,
) -> None:
    adapters = {"a": lora(tiny_base, 4, seed=1)}
    batcher = Batcher(
        InferenceEngine(tiny_base),
        adapters.__getitem__,
        max_batch_size=8,
        max_wait_ms=FOREVER_MS,
        max_queue_rows=64,
    )
    batcher.start()

    async def submit(*texts: str) -> list[bool]:
        rows = [Row("a", t) for t in texts]
        results = await asyncio.wait_for(batcher.submit(rows, "unmerged"), 60)
        return [r.ok for r in results]

    async def together() -> list[list[bool]]:
        # Both arrive within max_wait of the one before: the first waits for company, and the
        # second fills its batch (8 rows), which then runs.
        pending = [asyncio.ensure_future(submit(*["good"] * 4)) for _ in range(2)]
        return await asyncio.gather(*pending)

    try:
        assert asyncio.run(submit("the movie was great")) == [True]
        assert (batcher.stats.batches, batcher.stats.rows) == (1, 1)
        assert asyncio.run(together()) == [[True] * 4, [True] * 4]
        assert (batcher.stats.batches, batcher.stats.rows) == (2, 9)
    finally:
        batcher.stop()


class RecordingEngine(InferenceEngine):
    """The real engine, keeping each planned batch's rows (in planning order: the owner
    thread's), and holding the compute of batches with rows of ``hold`` until ``held`` is set."""

    def __init__(self, base: FrozenBase, hold: Collection[Hashable] = ()) -> None:
        super().__init__(base)
        self.planned: list[list[Row]] = []
        self.hold = set(hold)
        self.held = threading.Event()

    def plan(self, rows: Sequence[Row], **kw: Any) -> Plan:
        self.planned.append(list(rows))
        return super().plan(rows, **kw)

    def execute(self, plan: Plan) -> list[RowResult]:
        if self.hold & {r.key for r in plan.rows}:
            self.held.wait(60)
        return super().execute(plan)


def two_tenants(engine: InferenceEngine, base: FrozenBase, **kw: Any) -> Batcher:
    """A batcher over adapters of tenants A and B (and C, for the tests that need a third)."""
    adapters = {A: lora(base, 4, seed=1), B: lora(base, 4, seed=2), C: lora(base, 4, seed=3)}
    for key, adapter in adapters.items():
        engine.load(key, adapter)  # before the batcher starts: no owner thread yet
    options = {"max_wait_ms": 0.0, "max_queue_rows": 1000, **kw}
    return Batcher(engine, adapters.__getitem__, **options)


def encoded_rows(base: FrozenBase, key: Hashable, texts: list[str]) -> list[Row]:
    encoded = RowEncoder(base).encode([(t, None) for t in texts], base.max_length)
    return [Row(key, t, encoded=e) for t, e in zip(texts, encoded, strict=True)]


def tokens(row: Row) -> int:
    assert row.encoded is not None
    return len(row.encoded.input_ids)


def test_another_tenants_row_is_answered_before_a_request_many_batches_long(
    tiny_base: FrozenBase,
) -> None:
    engine = RecordingEngine(tiny_base)
    batcher = two_tenants(engine, tiny_base, max_batch_size=2)
    answered: list[str] = []

    async def submit(name: str, rows: list[Row]) -> None:
        await batcher.submit(rows, "unmerged")
        answered.append(name)

    async def main() -> None:
        a = asyncio.ensure_future(submit("a", [Row(A, f"review {i}") for i in range(16)]))
        await asyncio.sleep(0)  # A's 16 rows (8 batches) are queued first
        b = asyncio.ensure_future(submit("b", [Row(B, "one short review")]))
        await asyncio.sleep(0)
        batcher.start()
        await asyncio.wait_for(asyncio.gather(a, b), 60)

    try:
        asyncio.run(main())
    finally:
        batcher.stop()
    assert answered == ["b", "a"]
    assert [r.key for r in engine.planned[0]] == [A, B]  # B's row is in the very next batch


def test_a_tenant_with_nothing_in_flight_runs_beside_a_busy_worker(tiny_base: FrozenBase) -> None:
    engine = RecordingEngine(tiny_base, hold={A})  # A's batches compute only once released
    batcher = two_tenants(engine, tiny_base, max_batch_size=2, workers=1)
    batcher.start()

    async def main() -> None:
        a = asyncio.ensure_future(batcher.submit([Row(A, "review")] * 8, "unmerged"))
        while not engine.planned:  # A's first batch holds the one worker
            await asyncio.sleep(0.01)
        b = await asyncio.wait_for(batcher.submit([Row(B, "one short review")], "unmerged"), 60)
        assert [r.ok for r in b] == [True]
        assert not a.done()
        engine.held.set()
        assert len(await asyncio.wait_for(a, 60)) == 8

    try:
        asyncio.run(main())
    finally:
        engine.held.set()
        batcher.stop()
    # A's queued rows never took the extra lane while A had a batch in flight.
    assert [[r.key for r in batch] for batch in engine.planned] == [[A, A], [B], *[[A, A]] * 3]


def test_two_flooding_tenants_get_equal_tokens_within_one_row(tiny_base: FrozenBase) -> None:
    engine = RecordingEngine(tiny_base)
    batcher = two_tenants(engine, tiny_base, max_batch_size=1)
    long_rows = encoded_rows(tiny_base, A, [f"a long review number {i} " * 3 for i in range(12)])
    short_rows = encoded_rows(tiny_base, B, [f"short {i}" for i in range(40)])
    longest = max(map(tokens, long_rows))
    assert longest > 3 * max(map(tokens, short_rows))  # fair by rows would not be by tokens

    async def main() -> None:
        pending = [
            asyncio.ensure_future(batcher.submit(rows, "unmerged"))
            for rows in (long_rows, short_rows)
        ]
        await asyncio.sleep(0)  # both floods are queued before the first batch forms
        batcher.start()
        await asyncio.wait_for(asyncio.gather(*pending), 60)

    try:
        asyncio.run(main())
    finally:
        batcher.stop()
    served = {A: 0, B: 0}
    for batch in engine.planned:
        (row,) = batch
        served[row.key] += tokens(row)
        if served[A] < sum(map(tokens, long_rows)) and served[B] < sum(map(tokens, short_rows)):
            assert abs(served[A] - served[B]) <= longest, served  # while both still queue


def test_a_request_split_over_batches_answers_in_order_as_one_run(tiny_base: FrozenBase) -> None:
    engine = RecordingEngine(tiny_base)
    texts = [f"{'a much longer review ' * (i % 4)}number {i}" for i in range(11)]
    rows = encoded_rows(tiny_base, A, texts)
    budget = 2 * max(map(tokens, rows))
    batcher = two_tenants(engine, tiny_base, max_batch_size=4, max_batch_tokens=budget)
    alone = engine.run(rows)  # one batch, before the batcher owns the engine
    engine.planned.clear()

    async def main() -> list[RowResult]:
        return await asyncio.wait_for(batcher.submit(rows, "unmerged"), 60)

    batcher.start()
    try:
        split = asyncio.run(main())
    finally:
        batcher.stop()
    assert len(engine.planned) > 3  # the budget split the request
    for batch in engine.planned:
        assert len(batch) == 1 or len(batch) * max(map(tokens, batch)) <= budget
    assert [r.key for r in split] == [A] * len(rows)
    for got, want in zip(split, alone, strict=True):
        torch.testing.assert_close(output(got), output(want), atol=1e-5, rtol=1e-5)


def test_rows_of_an_abandoned_request_are_not_computed(tiny_base: FrozenBase) -> None:
    engine = RecordingEngine(tiny_base, hold={A})
    batcher = two_tenants(engine, tiny_base, max_batch_size=2)
    batcher.start()

    async def main() -> None:
        a = asyncio.ensure_future(batcher.submit([Row(A, "review")] * 8, "unmerged"))
        while not engine.planned:  # A's first batch is computing, 6 rows still queued
            await asyncio.sleep(0.01)
        a.cancel()  # A's caller went away
        with contextlib.suppress(asyncio.CancelledError):
            await a
        assert batcher.queued_rows == 0
        engine.held.set()
        await asyncio.wait_for(batcher.submit([Row(B, "one short review")], "unmerged"), 60)

    try:
        asyncio.run(main())
    finally:
        engine.held.set()
        batcher.stop()
    assert [[r.key for r in batch] for batch in engine.planned] == [[A, A], [B]]


def test_a_tenant_whose_rows_wait_in_a_forming_batch_is_not_forgotten(
    tiny_base: FrozenBase,
) -> None:
    # While a batch waits for company the lock is let go, and another batch finishing forgets
    # idle tenants. A's last row is in the forming batch and B's row after it lifted the
    # virtual time past A's counter: A must still count as busy, or planning the batch fails
    # and the owner thread with it (every later request then waits forever).
    engine = RecordingEngine(tiny_base, hold={C})
    batcher = two_tenants(engine, tiny_base, max_batch_size=3, max_wait_ms=FOREVER_MS, workers=2)
    short = encoded_rows(tiny_base, A, ["short"])
    long = encoded_rows(tiny_base, B, ["a much longer review that goes on and on " * 3])
    c = encoded_rows(tiny_base, C, ["c"] * 3)
    # A's counter ends at 2 C rows + its row (where it started + what it took): B's must pass it.
    assert tokens(long[0]) >= 2 * tokens(c[0]) + tokens(short[0])
    batcher.start()

    async def submit(rows: list[Row]) -> list[bool]:
        return [r.ok for r in await asyncio.wait_for(batcher.submit(rows, "unmerged"), 60)]

    async def main() -> None:
        assert await submit(long) == [True]  # alone: at once; B's counter stays ahead
        first_c = asyncio.ensure_future(submit(c))
        while not engine.planned[1:]:  # C's full batch holds one of the two workers
            await asyncio.sleep(0.01)
        # batcher.submit itself, not through submit(): on Python 3.11 wait_for runs its
        # awaitable as another task, a loop step later, so after the sleep(0) neither row was
        # queued yet, the loop below saw no rows and C's batch could finish (and C's last row
        # arrive) before A's and B's rows were taken: [A, C, B], as fairness then says.
        a = asyncio.ensure_future(batcher.submit(short, "unmerged"))
        b = asyncio.ensure_future(batcher.submit(long, "unmerged"))
        await asyncio.sleep(0)  # both are queued (their adapters are resident: no fetch)
        while batcher.queued_rows:  # both rows are in the batch waiting for a third
            await asyncio.sleep(0.01)
        engine.held.set()
        assert await first_c == [True] * 3  # C's batch finished: idle tenants were forgotten
        assert await submit(c[:1]) == [True]  # fills the waiting batch
        for pending in (a, b):
            assert [r.ok for r in await asyncio.wait_for(pending, 60)] == [True]

    try:
        asyncio.run(main())
    finally:
        engine.held.set()
        batcher.stop()
    assert [[r.key for r in batch] for batch in engine.planned] == [[B], [C] * 3, [A, B, C]]


class FailingPolicy(AutoModePolicy):
    """Fails to choose a mode for A's adapter: an error in planning outside the engine."""

    def mode_for(self, key: Hashable | None) -> ForwardMode:
        if key == A:
            raise RuntimeError("no mode for A")
        return super().mode_for(key)


def test_an_error_planning_a_batch_fails_its_requests_and_the_batcher_goes_on(
    tiny_base: FrozenBase,
) -> None:
    engine = RecordingEngine(tiny_base)
    batcher = two_tenants(engine, tiny_base, max_batch_size=2, policy=FailingPolicy())
    batcher.start()

    async def main() -> None:
        with pytest.raises(RuntimeError, match="no mode for A"):
            await asyncio.wait_for(batcher.submit([Row(A, "review")] * 3, "auto"), 60)
        b = await asyncio.wait_for(batcher.submit([Row(B, "one short review")], "auto"), 60)
        assert [r.ok for r in b] == [True]
        assert batcher.queued_rows == 0  # A's rows left after the failed batch were dropped

    try:
        asyncio.run(main())
    finally:
        batcher.stop()


def test_a_flooding_tenant_is_refused_past_half_the_queue_and_others_still_get_in(
    tiny_base: FrozenBase,
) -> None:
    engine = RecordingEngine(tiny_base)
    batcher = two_tenants(engine, tiny_base, max_batch_size=4, max_queue_rows=8)

    async def main() -> None:
        # Queued before the batcher starts, so nothing leaves the queue meanwhile.
        a = asyncio.ensure_future(batcher.submit([Row(A, "review")] * 4, "unmerged"))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="at most 4"):
            await asyncio.wait_for(batcher.submit([Row(A, "more")], "unmerged"), 60)  # A's half
        b = asyncio.ensure_future(batcher.submit([Row(B, "review")] * 4, "unmerged"))
        await asyncio.sleep(0)
        assert batcher.queued_rows == 8  # B got in beside A's flood
        batcher.start()
        answered = await asyncio.wait_for(asyncio.gather(a, b), 60)
        assert [len(r) for r in answered] == [4, 4]

    try:
        asyncio.run(main())
    finally:
        batcher.stop()


def test_busy_while_rows_wait_or_compute_and_for_a_moment_after(
    tiny_base: FrozenBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What lets generation borrow cores only while no encoder batch runs (busy())."""
    from service.serving import batcher as batcher_module

    engine = RecordingEngine(tiny_base, hold={A})
    batcher = two_tenants(engine, tiny_base, max_batch_size=2)
    assert not batcher.busy()  # never ran
    batcher.start()

    async def main() -> None:
        pending = asyncio.ensure_future(batcher.submit([Row(A, "held")], "unmerged"))
        for _ in range(200):  # until the batch is planned and computing (held)
            if engine.planned:
                break
            await asyncio.sleep(0.01)
        assert engine.planned and batcher.busy()
        engine.held.set()
        await asyncio.wait_for(pending, 60)

    try:
        asyncio.run(main())
        monkeypatch.setattr(batcher_module, "BUSY_HOLD_S", 60.0)
        assert batcher.busy()  # finished within BUSY_HOLD_S
        monkeypatch.setattr(batcher_module, "BUSY_HOLD_S", 0.0)
        assert not batcher.busy()
    finally:
        batcher.stop()
