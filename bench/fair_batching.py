"""Fair batching in one process: what tenant A's maximal requests do to tenant B's one-text
latency through the batcher itself (no HTTP), and what a batch costs.

Real MiniLM in fp32, one random LoRA adapter per tenant, the server's layout on 2 cores with the
embedded worker: one inference worker with one torch thread (the batcher adds its lane for
tenants with nothing in flight). Printed:

1. What one forward costs: ``k`` rows of 256 tokens (the window) and of 16 tokens, one torch
   thread: ms and rows/s. The figures behind ``LORAPLEX_MAX_BATCH_TOKENS``'s default.
2. For each token budget (the default 256, and none: batches of ``max_batch_size`` rows):
   A's request of ``N`` rows x 256 tokens alone (seconds, rows/s); B's one-row requests, one at
   a time, idle and while A keeps ``C`` such requests queued (p50/p99, ratio to idle).

    python -m bench.fair_batching --quick
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see README)

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.http_load import summarize
from bench.mixed_batch import bench_texts, lora_adapter
from core.base import FrozenBase, load_base_model
from core.inference import InferenceEngine, Row, RowEncoder
from service.serving.batcher import Batcher

A = ("tenant-a", "flood", 1)
B = ("tenant-b", "small", 1)
WINDOW = 256


def rows_of(base: FrozenBase, key: tuple[str, str, int], texts: list[str]) -> list[Row]:
    encoded = RowEncoder(base).encode([(t, None) for t in texts], base.max_length)
    return [Row(key, t, encoded=e) for t, e in zip(texts, encoded, strict=True)]


def forward_costs(base: FrozenBase, reps: int) -> list[dict[str, Any]]:
    engine = InferenceEngine(base)
    engine.load(A, lora_adapter(base, 8, 1))
    out = []
    for tokens in (WINDOW, 16):
        rows = rows_of(base, A, bench_texts(base, 32, tokens))
        for k in (1, 2, 4, 8, 16, 32):
            engine.run(rows[:k])
            best = float("inf")
            for _ in range(max(2, reps // k)):
                t0 = time.perf_counter()
                engine.run(rows[:k])
                best = min(best, time.perf_counter() - t0)
            out.append(
                {
                    "tokens": tokens,
                    "rows": k,
                    "padded_tokens": k * tokens,
                    "ms": round(best * 1000, 1),
                    "rows_per_s": round(k / best, 1),
                }
            )
    return out


def b_latency(batcher: Batcher, row: Row, seconds: float) -> dict[str, Any]:
    async def loop() -> list[float]:
        latencies: list[float] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            await batcher.submit([row], "auto")
            latencies.append(time.perf_counter() - t0)
        return latencies

    latencies = asyncio.run(loop())
    row_figures = summarize(latencies, 0, seconds)
    return {k: row_figures[k] for k in ("requests", "p50_ms", "p99_ms")}


class Flood:
    """A keeps ``clients`` requests of its rows in the batcher, closed loop, on its own loop."""

    def __init__(self, batcher: Batcher, rows: list[Row], clients: int) -> None:
        self.batcher, self.rows, self.clients = batcher, rows, clients
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async def one() -> None:
            while not self._stop.is_set():
                await self.batcher.submit(self.rows, "auto")
                self.answered += 1

        await asyncio.gather(*(one() for _ in range(self.clients)))

    def __enter__(self) -> Flood:
        self._thread.start()
        time.sleep(0.5)  # A's rows are queued before B measures
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()  # the requests in flight finish


def scheduling(base: FrozenBase, budget: int | None, args: argparse.Namespace) -> dict[str, Any]:
    engine = InferenceEngine(base)
    adapters = {A: lora_adapter(base, 8, 1), B: lora_adapter(base, 8, 2)}
    batcher = Batcher(
        engine,
        adapters.__getitem__,
        max_batch_size=64,
        max_batch_tokens=budget,
        max_wait_ms=5.0,
        max_queue_rows=1 << 20,
        workers=1,
        threads=1,
    )
    batcher.start()
    a_rows = rows_of(base, A, bench_texts(base, args.rows, WINDOW))
    (b_row,) = rows_of(base, B, ["a fine film"])
    try:
        asyncio.run(batcher.submit(a_rows[:1], "auto"))  # both adapters resident
        t0 = time.perf_counter()
        asyncio.run(batcher.submit(a_rows, "auto"))
        alone = time.perf_counter() - t0
        idle = b_latency(batcher, b_row, args.seconds)
        with Flood(batcher, a_rows, args.clients):
            flooded = b_latency(batcher, b_row, args.seconds)
    finally:
        batcher.stop()
    return {
        "max_batch_tokens": budget,
        "a_alone": {
            "rows": args.rows,
            "seconds": round(alone, 2),
            "rows_per_s": round(args.rows / alone, 1),
        },
        "b_idle": idle,
        "b_while_a_floods": flooded,
        "p50_ratio": round(flooded["p50_ms"] / idle["p50_ms"], 2),
        "p99_ratio": round(flooded["p99_ms"] / idle["p99_ms"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="rows per A request (N)")
    parser.add_argument("--clients", type=int, default=2, help="A's requests queued (C)")
    parser.add_argument("--seconds", type=float, default=15.0, help="per B measurement")
    parser.add_argument("--reps", type=int, default=16, help="forwards timed per batch size")
    parser.add_argument("--quick", action="store_true", help="64-row requests, 6 s (~2 min)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.seconds, args.reps = 64, 6.0, 8
    torch.set_num_threads(1)
    base = load_base_model(device="cpu")
    figures = {
        "cores": os.cpu_count(),
        "forward_costs": forward_costs(base, args.reps),
        "scheduling": [scheduling(base, budget, args) for budget in (256, None)],
    }
    print(f"{'tokens':>7}{'rows':>6}{'padded':>8}{'ms':>9}{'rows/s':>9}")
    for c in figures["forward_costs"]:
        print(
            f"{c['tokens']:>7}{c['rows']:>6}{c['padded_tokens']:>8}{c['ms']:>9}{c['rows_per_s']:>9}"
        )
    print(
        f"\n{'budget':>7}{'A alone s':>11}{'A rows/s':>10}{'B idle p50':>12}{'p99':>8}"
        f"{'B flood p50':>13}{'p99':>8}{'p50 x':>7}{'p99 x':>7}"
    )
    for s in figures["scheduling"]:
        a, i, f = s["a_alone"], s["b_idle"], s["b_while_a_floods"]
        print(
            f"{s['max_batch_tokens'] or 'none':>7}{a['seconds']:>11}{a['rows_per_s']:>10}"
            f"{i['p50_ms']:>12}{i['p99_ms']:>8}{f['p50_ms']:>13}{f['p99_ms']:>8}"
            f"{s['p50_ratio']:>7}{s['p99_ratio']:>7}"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
