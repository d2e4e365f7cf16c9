"""The batcher against an adapter cache too small for the adapters in use at once (real engine,
tiny random base): rows whose adapter fits the cache alone are parked and run once nothing is
in flight, never failed; an adapter larger than the whole cache fails at once."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import torch

from core.adapter import Adapter
from core.base import FrozenBase
from core.inference import InferenceEngine, Row, RowResult
from core.inference.residency import AdapterTooLargeError
from service.serving.batcher import Batcher, QueueFullError
from tests.core.inference.helpers import lora, output, reference
from tests.service.serving.test_batcher import RecordingEngine

TEXT = "the movie was great"
A = [("tenant-a", f"a{i}", 1) for i in range(4)]  # (tenant_id, name, version), as the service
B = ("tenant-b", "b0", 1)


def same_size_adapters(base: FrozenBase, keys: list[Hashable]) -> dict[Hashable, Adapter]:
    """LoRA r=4 adapters of one size (each charges the cache the same bytes)."""
    return {key: lora(base, 4, seed=i + 1) for i, key in enumerate(keys)}


def one_adapter_bytes(base: FrozenBase, adapter: Adapter) -> int:
    probe = InferenceEngine(base)
    probe.load("probe", adapter)
    return probe.stats.resident_bytes


def check(base: FrozenBase, adapters: dict[Hashable, Adapter], results: list[RowResult]) -> None:
    """Each result is its adapter's answer for TEXT computed alone."""
    for result in results:
        want = reference(base, adapters[result.key], TEXT)
        torch.testing.assert_close(output(result), want, atol=1e-5, rtol=0)


async def queued(batcher: Batcher, rows: int) -> None:
    """Until ``rows`` rows wait (cold adapters are read in a worker thread before queueing)."""
    for _ in range(6000):
        if batcher.queued_rows == rows:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{batcher.queued_rows} rows queued, not {rows}")


def test_a_batch_of_more_adapters_than_the_cache_holds_answers_every_row(
    tiny_base: FrozenBase,
) -> None:
    adapters = same_size_adapters(tiny_base, A)
    engine = RecordingEngine(tiny_base)
    engine.max_resident_bytes = 2 * one_adapter_bytes(tiny_base, adapters[A[0]])  # holds two
    batcher = Batcher(
        engine, adapters.__getitem__, max_batch_size=8, max_wait_ms=0.0, max_queue_rows=64
    )

    async def main() -> list[list[RowResult]]:
        pending = [asyncio.ensure_future(batcher.submit([Row(k, TEXT)], "unmerged")) for k in A]
        await queued(batcher, 4)  # before the batcher starts: one batch of all four
        batcher.start()
        return await asyncio.wait_for(asyncio.gather(*pending), 60)

    try:
        answers = asyncio.run(main())
    finally:
        batcher.stop()
    assert [[r.ok for r in answer] for answer in answers] == [[True]] * 4
    check(tiny_base, adapters, [r for answer in answers for r in answer])
    # a0 and a1 loaded in the first batch; a2 and a3 found no room beside them, waited for
    # that batch to end and ran alone, evicting them.
    assert [[r.key for r in batch] for batch in engine.planned] == [A, A[2:]]
    assert engine.stats.evictions == 2
    assert batcher.queued_rows == 0


def test_a_row_waits_for_the_batch_in_flight_that_pins_the_cache(tiny_base: FrozenBase) -> None:
    adapters = same_size_adapters(tiny_base, [*A[:2], B])
    engine = RecordingEngine(tiny_base, hold={A[0]})  # A's batch computes only once released
    engine.max_resident_bytes = 2 * one_adapter_bytes(tiny_base, adapters[B])  # holds two
    batcher = Batcher(
        engine,
        adapters.__getitem__,
        max_batch_size=8,
        max_wait_ms=0.0,
        max_queue_rows=64,
        workers=1,
    )
    answered: list[Hashable] = []

    async def submit(key: Hashable) -> list[RowResult]:
        results = await batcher.submit([Row(key, TEXT)], "unmerged")
        answered.append(key)
        return results

    async def main() -> list[list[RowResult]]:
        a = [asyncio.ensure_future(submit(k)) for k in A[:2]]
        await queued(batcher, 2)
        batcher.start()  # A's batch pins a0 and a1, the whole cache, and holds the worker
        b = asyncio.ensure_future(submit(B))  # B has nothing in flight: the extra lane
        while not (b.done() or (len(engine.planned) == 2 and batcher.queued_rows == 1)):
            await asyncio.sleep(0.01)
        assert not b.done()  # parked, not failed
        engine.held.set()
        return await asyncio.wait_for(asyncio.gather(*a, b), 60)

    try:
        answers = asyncio.run(main())
    finally:
        engine.held.set()
        batcher.stop()
    assert [[r.ok for r in answer] for answer in answers] == [[True]] * 3
    check(tiny_base, adapters, [r for answer in answers for r in answer])
    assert answered[-1] == B
    assert [[r.key for r in batch] for batch in engine.planned] == [A[:2], [B], [B]]


def test_an_adapter_larger_than_the_whole_cache_fails_at_once(tiny_base: FrozenBase) -> None:
    adapters = same_size_adapters(tiny_base, A[:1])
    size = one_adapter_bytes(tiny_base, adapters[A[0]])
    engine = InferenceEngine(tiny_base, max_resident_bytes=size - 1)
    batcher = Batcher(
        engine, adapters.__getitem__, max_batch_size=8, max_wait_ms=0.0, max_queue_rows=64
    )
    batcher.start()
    try:
        results = asyncio.run(asyncio.wait_for(batcher.submit([Row(A[0], TEXT)], "unmerged"), 60))
    finally:
        batcher.stop()
    error = results[0].error
    assert isinstance(error, AdapterTooLargeError)  # not parked: no wait makes it fit
    assert (error.nbytes, error.budget) == (size, size - 1)
    assert batcher.queued_rows == 0


def test_each_refused_request_is_reported(tiny_base: FrozenBase) -> None:
    adapters = same_size_adapters(tiny_base, A[:1])
    engine = InferenceEngine(tiny_base)
    engine.load(A[0], adapters[A[0]])
    refused: list[None] = []
    batcher = Batcher(
        engine,
        adapters.__getitem__,
        max_batch_size=4,
        max_wait_ms=0.0,
        max_queue_rows=4,
        on_reject=lambda: refused.append(None),
    )

    async def main() -> None:
        # Queued before the batcher starts, so nothing leaves the queue meanwhile.
        first = asyncio.ensure_future(batcher.submit([Row(A[0], TEXT)] * 2, "unmerged"))
        await asyncio.sleep(0)
        for _ in range(3):  # past the tenant's half of the queue
            try:
                await batcher.submit([Row(A[0], TEXT)], "unmerged")
            except QueueFullError:
                continue
            raise AssertionError("not refused")
        batcher.start()
        assert len(await asyncio.wait_for(first, 60)) == 2

    try:
        asyncio.run(main())
    finally:
        batcher.stop()
    assert len(refused) == 3
