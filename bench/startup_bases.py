"""Start-up time and memory of ``loraplex serve`` per set of bases (LORAPLEX_BASES).

For each of encoder only, decoder only and both: a fresh ``loraplex serve`` (no embedded
worker, so the API process alone is measured) on a new SQLite data dir, timed from spawn to
the first 200 of /readyz, then its resident memory (VmRSS) and peak (VmHWM) read from /proc.
``--repeat`` runs each case that many times, interleaved, and reports the median. A decoder's
generation KV cache (LORAPLEX_GENERATION_KV_CACHE_MB, 1024 MiB by default) is part of its RSS;
``--kv-cache-mb`` sets it, to tell the base's own memory from the cache's.

    python -m bench.startup_bases [--repeat 3] [--kv-cache-mb N] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from service.config import DEFAULT_BASE_MODEL_NAME, DEFAULT_DECODER_NAME
from tests.e2e.server import ServerProcess, status_kib

CASES = {
    "encoder": DEFAULT_BASE_MODEL_NAME,
    "decoder": DEFAULT_DECODER_NAME,
    "both": f"{DEFAULT_BASE_MODEL_NAME},{DEFAULT_DECODER_NAME}",
}


def measure(bases: str, kv_cache_mb: int | None = None) -> dict[str, float]:
    """One start: seconds to ready, RSS and peak RSS (MiB) of the API process once ready."""
    with tempfile.TemporaryDirectory(prefix="lpx-startup-") as data_dir:
        settings: dict[str, object] = {
            "bases": bases,
            "embedded_worker": "false",
            "generation_kv_cache_mb": kv_cache_mb,  # None: the default
            # None: the server's default dtype (auto), not the float32 the e2e harness pins.
            "generation_dtype": None,
        }
        server = ServerProcess(Path(data_dir), settings)
        started = time.perf_counter()
        try:
            server.start()
            ready_s = time.perf_counter() - started
            assert server.proc is not None
            return {
                "ready_s": ready_s,
                "rss_mib": status_kib(server.proc.pid, "VmRSS") / 1024,
                "peak_rss_mib": status_kib(server.proc.pid, "VmHWM") / 1024,
            }
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kv-cache-mb", type=int, help="the decoder's KV cache (default 1024)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
    for _ in range(args.repeat):  # interleaved: a slow moment of the machine hits every case
        for case, bases in CASES.items():
            runs[case].append(measure(bases, args.kv_cache_mb))
    result = {
        case: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        for case, rows in runs.items()
    }
    if args.json:
        report = {"repeat": args.repeat, "kv_cache_mb": args.kv_cache_mb, "median": result}
        print(json.dumps(report))
        return 0
    print(f"median of {args.repeat}  ready s  RSS MiB  peak RSS MiB")
    for case, row in result.items():
        print(
            f"{case:<8}             {row['ready_s']:7.1f}  {row['rss_mib']:7.0f}  "
            f"{row['peak_rss_mib']:12.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
