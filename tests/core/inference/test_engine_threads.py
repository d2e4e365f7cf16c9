"""Plans computed off the owner thread: pinned adapters, concurrent ``execute`` calls."""

from __future__ import annotations

import random
from collections.abc import Hashable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import torch

from core.adapter import Adapter
from core.base import FrozenBase
from core.inference import InferenceEngine, Plan, Row
from tests.core.inference.helpers import lora, output, reference

TEXTS = ["the movie was great", "a boring film", "fun", "the plot was fine, the end was not"]


def adapter_bytes(base: FrozenBase, adapter: Adapter) -> int:
    probe = InferenceEngine(base)
    probe.load("x", adapter)
    return probe.stats.resident_bytes


def check(
    base: FrozenBase, adapters: dict[Hashable, Adapter], rows: list[Row], results: list
) -> None:
    for row, res in zip(rows, results, strict=True):
        want = reference(base, adapters[row.key], row.text)
        torch.testing.assert_close(output(res), want, atol=1e-5, rtol=0)


def test_a_planned_batch_keeps_its_adapters_until_released(tiny_base: FrozenBase) -> None:
    adapters: dict[Hashable, Adapter] = {
        k: lora(tiny_base, 4, seed=i) for i, k in enumerate("abcd")
    }
    size = adapter_bytes(tiny_base, adapters["a"])
    engine = InferenceEngine(tiny_base, max_resident_bytes=3 * size)
    engine.load("a", adapters["a"])
    engine.load("b", adapters["b"])
    rows = [Row("a", TEXTS[0]), Row("b", TEXTS[1]), Row("a", TEXTS[2])]
    plan = engine.plan(rows)

    # Unloaded while planned: out of service at once, but its slot stays until the release.
    assert engine.unload("a") and "a" not in engine
    assert engine.stats.resident_bytes == 2 * size and len(engine.bank) == 2
    engine.load("c", adapters["c"])  # fits beside the retired "a" and the pinned "b"
    # "b" is the least recently used resident, but the plan holds it: "c" goes instead.
    assert engine.load("d", adapters["d"]) == ["c"]
    assert "b" in engine and engine.stats.resident_bytes == 3 * size

    check(tiny_base, adapters, rows, engine.execute(plan))  # the original weights, intact
    engine.release(plan)  # outside inference mode, like the service's owner thread
    assert engine.stats.resident_bytes == 2 * size and len(engine.bank) == 2
    assert sorted(map(str, engine.resident_keys())) == ["b", "d"]
    # The freed slot is reused and serves its new adapter.
    engine.load("a", adapters["a"])
    rows = [Row("a", TEXTS[3]), Row("d", TEXTS[0])]
    check(tiny_base, adapters, rows, engine.run(rows))


def test_plans_executed_in_parallel_while_the_owner_loads_and_evicts(
    tiny_base: FrozenBase,
) -> None:
    """The service's pattern: one owner plans and releases, a pool of 3 executes."""
    adapters: dict[Hashable, Adapter] = {i: lora(tiny_base, 4, seed=i) for i in range(10)}
    size = adapter_bytes(tiny_base, adapters[0])
    # Plans in flight pin at most 2 adapters each (twice if unloaded and reloaded meanwhile):
    # 8 always fit, and 10 adapters in turn keep the owner evicting.
    engine = InferenceEngine(tiny_base, max_resident_bytes=8 * size)
    rng = random.Random(0)
    checked = 0

    def settle(finished: set[Future[tuple[Plan, list]]]) -> None:
        nonlocal checked
        for future in finished:
            plan, results = future.result()
            engine.release(plan)
            check(tiny_base, adapters, list(plan.rows), results)
            checked += 1

    with ThreadPoolExecutor(max_workers=3) as pool:
        pending: set[Future[tuple[Plan, list]]] = set()
        for step in range(60):
            if len(pending) == 3:  # like the batcher: plan only when a worker is free
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                settle(finished)
            keys = rng.sample(list(adapters), 2)
            rows = [Row(rng.choice(keys), rng.choice(TEXTS)) for _ in range(rng.randint(1, 6))]
            plan = engine.plan(rows, loader=adapters.__getitem__)
            pending.add(pool.submit(lambda p: (p, engine.execute(p)), plan))
            if step % 7 == 0:
                engine.unload(rng.choice(list(adapters)))  # an invalidation between batches
        settle(wait(pending).done)
    assert checked == 60
    assert engine.stats.evictions > 0
    assert engine.stats.resident_bytes <= engine.max_resident_bytes
    assert engine.stats.resident_count == len(engine.bank) == len(engine.resident_keys())
