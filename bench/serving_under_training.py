"""Serving while training: /predict latency idle vs during a fine-tuning job, same server.

Starts ``loraplex serve`` the default way (real MiniLM, embedded worker child process, SQLite
in a temp dir), stores one random LoRA adapter, then drives ``/predict`` (one text a request,
C concurrent clients, closed loop) for T seconds twice:

1. idle: no job;
2. while a LoRA job trains on the embedded worker (it is checked to be running, and to have
   made progress, through the whole window; it is cancelled afterwards).

Reports p50/p95/p99 and errors for both, the p99 ratio (target: at most 3x), and the thread
budgets: serving threads (``LORAPLEX_TORCH_THREADS``, default half the cores with an embedded
worker) and training threads (``LORAPLEX_TRAIN_THREADS``, default the other half, as the job's
"Training ..." event reports). ``--train-threads`` overrides the training budget, e.g. to show
what an unbounded trainer does to serving.

    python -m bench.serving_under_training --quick --json serving_under_training.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see README)

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import fixture_reviews
from bench.http_load import drive, store_random_adapters
from tests.e2e.server import ServerProcess

TARGET_RATIO = 3.0


def _job_body(file_id: str) -> dict[str, Any]:
    return {
        "training_file": file_id,
        "adapter_name": "under-load",
        "seed": 1,
        "method": {
            "type": "lora",
            "lora": {"r": 8},
            # Long enough to outlast the window; cancelled when the measurement is done.
            "hyperparameters": {"n_epochs": 50, "batch_size": 16, "max_seq_length": 128},
        },
    }


def _step(client: Any, job_id: str) -> tuple[str, int]:
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    return job["status"], int(job["progress"]["step"] or 0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = fixture_reviews()
    texts = [r["text"] for r in rows]
    settings: dict[str, Any] = {"checkpoint_every_steps": 50}
    if args.serve_threads:
        settings["torch_threads"] = args.serve_threads
    if args.train_threads:
        settings["train_threads"] = args.train_threads
    with tempfile.TemporaryDirectory(prefix="loraplex-sut-") as tmp:
        server = ServerProcess(Path(tmp), settings=settings).start()
        try:
            names = store_random_adapters(server.data_dir, 1, prefix="serve")
            with server.client() as client:
                # Warm-up: the adapter becomes resident, the first batches pay their costs.
                asyncio.run(drive(server.base_url, server.api_key, names, texts, 2, 3.0))

                def load() -> dict[str, Any]:
                    url, key, c, s = server.base_url, server.api_key, args.concurrency, args.seconds
                    return asyncio.run(drive(url, key, names, texts, c, s))

                idle = load()
                print(f"[sut] idle: {idle}", file=sys.stderr, flush=True)

                up = client.post(
                    "/v1/datasets",
                    json={"kind": "classification", "records": rows[:400]},
                )
                up.raise_for_status()
                job = client.post("/v1/fine_tuning/jobs", json=_job_body(up.json()["id"]))
                job.raise_for_status()
                job_id = job.json()["id"]
                deadline = time.monotonic() + 300
                while _step(client, job_id)[1] < 2:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the training job never started")
                    time.sleep(0.5)
                status0, step0 = _step(client, job_id)
                training = load()
                status1, step1 = _step(client, job_id)
                print(f"[sut] training: {training}", file=sys.stderr, flush=True)
                events = client.get(
                    f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc"}
                ).json()["data"]
                started = next(e for e in events if e["message"].startswith("Training "))
                client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
            log = (server.data_dir / f"server-{server.port}.log").read_text(errors="replace")
        finally:
            server.stop()
    serving_threads = args.serve_threads or max(1, (os.cpu_count() or 2) // 2)
    ratio = training["p99_ms"] / idle["p99_ms"] if idle["p99_ms"] else float("nan")
    return {
        "cores": os.cpu_count(),
        "concurrency": args.concurrency,
        "seconds_per_phase": args.seconds,
        "serving_threads": serving_threads,
        "training_threads": (started.get("data") or {}).get("threads"),
        "idle": idle,
        "training": training,
        "job_ran_through_window": status0 == status1 == "running" and step1 > step0,
        "train_steps_during_window": step1 - step0,
        "p50_ratio": round(training["p50_ms"] / idle["p50_ms"], 2) if idle["p50_ms"] else None,
        "p99_ratio": round(ratio, 2),
        "target_p99_ratio": TARGET_RATIO,
        "meets_target": training["errors"] == 0 and ratio <= TARGET_RATIO,
        "server_errors_logged": log.count("unhandled error on"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="per phase")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--serve-threads", type=int, default=None)
    parser.add_argument("--train-threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="20 s per phase (< 2 min)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 20.0)
    figures = run(args)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
