"""The batcher on its own (real engine, tiny random base): when a batch waits for company."""

from __future__ import annotations

import asyncio

from core.base import FrozenBase
from core.inference import InferenceEngine, Row
from service.serving.batcher import Batcher
from tests.core.inference.helpers import lora

FOREVER_MS = 600_000.0  # a wait no test could sit through: reaching it fails the deadline


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
