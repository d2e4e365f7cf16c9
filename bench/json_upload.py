"""A maximal JSON dataset upload: memory and event-loop stall, streamed reader vs whole-body parse.

Two bodies of ``LORAPLEX_MAX_UPLOAD_MB`` (default 50 MB): ``valid``, real review rows up to
``max_dataset_rows`` (what the server must keep), and ``empties``, the ``{"records": [{}, {},
...]}`` of issue 14 (what it must refuse). For each, two ways to read it:

- ``whole`` (the baseline, the route before): pydantic parses the whole body into objects on the
  event loop, then each record is normalised;
- ``streamed`` (the route now): ``parse_json_body`` reads 64 KiB chunks in a worker thread and
  normalises records as they are parsed, stopping at the first problem.

Memory: each variant runs in a fresh child process (fork, after the body is built) and reports
its peak RSS above what it started with (the body itself is not counted, though the old route
also held it whole). Stall: the longest gap between the ticks of a 1 ms asyncio ticker while
the variant runs (on the loop, or in ``run_in_threadpool``), the wait every other request on
the server had. Both in one run, so the ratios compare like with like.

    python -m bench.json_upload [--upload-mb 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import time
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from bench.common import fixture_reviews
from service.api.schemas.datasets import DatasetCreateJSON
from service.config import Settings
from service.datasets.reading import Record
from service.datasets.rows import DatasetError, Limits, normalize_row
from service.datasets.validation import parse_json_body

CHUNK = 64 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")


def valid_body(max_bytes: int, max_rows: int) -> bytes:
    rows = [json.dumps(r).encode() for r in fixture_reviews()]
    head, parts, size = b'{"kind": "classification", "records": [', [], 45
    while len(parts) < max_rows and size + len(rows[len(parts) % len(rows)]) + 2 <= max_bytes:
        parts.append(rows[len(parts) % len(rows)])
        size += len(parts[-1]) + 2
    return head + b", ".join(parts) + b"]}"


def empties_body(max_bytes: int) -> bytes:
    head = b'{"kind": "classification", "records": ['
    return head + b", ".join([b"{}"] * ((max_bytes - len(head) - 2) // 4)) + b"]}"


def whole(body: bytes, limits: Limits) -> str:
    """The route before: the whole body parsed into objects, then each record normalised."""
    payload = DatasetCreateJSON.model_validate_json(body)
    try:
        rows = [
            normalize_row(payload.kind, r, Record(i), limits) for i, r in enumerate(payload.records)
        ]
    except DatasetError as exc:
        return f"422 {exc.code}"
    return f"{len(rows)} rows"


def streamed(body: bytes, limits: Limits) -> str:
    chunks = (body[i : i + CHUNK] for i in range(0, len(body), CHUNK))
    try:
        parsed, _ = parse_json_body(chunks, limits)
    except DatasetError as exc:
        return f"422 {exc.code}"
    return f"{parsed.row_count} rows"


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE // 1024


def _child(read: Callable[[bytes, Limits], str], body: bytes, limits: Limits, out: Any) -> None:
    start = _rss_kib()
    answer = read(body, limits)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out.send((answer, max(0, peak - start) / 1024))


def peak_rss_mib(read: Callable[[bytes, Limits], str], body: bytes, limits: Limits) -> Any:
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(read, body, limits, send))
    child.start()
    answer, mib = receive.recv()
    child.join()
    return answer, mib


async def _stall(run: Callable[[], Any]) -> tuple[float, float]:
    """(the longest gap between 1 ms ticks, seconds) while ``run`` runs; and its duration."""
    longest, done = 0.0, False

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    await run()
    took = time.perf_counter() - started
    done = True
    await task
    return longest, took


def loop_stall(variant: str, body: bytes, limits: Limits) -> tuple[float, float]:
    async def on_loop() -> None:
        whole(body, limits)

    async def in_thread() -> None:
        await run_in_threadpool(streamed, body, limits)

    return asyncio.run(_stall(on_loop if variant == "whole" else in_thread))


def main() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upload-mb", type=int, default=settings.max_upload_mb)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    max_bytes = args.upload_mb * 1024 * 1024
    limits = Limits(max_rows=settings.max_dataset_rows)
    bodies = {
        "valid": valid_body(max_bytes, limits.max_rows),
        "empties": empties_body(max_bytes),
    }
    results: dict[str, Any] = {}
    for name, body in bodies.items():
        row: dict[str, Any] = {"body_mb": round(len(body) / 2**20, 1)}
        for variant, read in (("whole", whole), ("streamed", streamed)):
            answer, mib = peak_rss_mib(read, body, limits)
            stall, took = loop_stall(variant, body, limits)
            row[variant] = {
                "answer": answer,
                "peak_rss_mib": round(mib, 1),
                "loop_stall_ms": round(stall * 1000, 1),
                "seconds": round(took, 2),
            }
        row["rss_ratio"] = round(
            row["whole"]["peak_rss_mib"] / max(row["streamed"]["peak_rss_mib"], 0.1), 1
        )
        row["stall_ratio"] = round(
            row["whole"]["loop_stall_ms"] / max(row["streamed"]["loop_stall_ms"], 0.1), 1
        )
        results[name] = row
        print(f"{name} ({row['body_mb']} MB body)")
        for variant in ("whole", "streamed"):
            r = row[variant]
            print(
                f"  {variant:9s} {r['answer']:>22s}  peak RSS +{r['peak_rss_mib']:7.1f} MiB  "
                f"loop stall {r['loop_stall_ms']:8.1f} ms  ({r['seconds']:.2f} s)"
            )
        print(f"  whole/streamed: RSS {row['rss_ratio']}x, loop stall {row['stall_ratio']}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
