"""Serving while training: latency idle vs during a fine-tuning job, same server.

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

``--generate`` serves SmolLM2 beside MiniLM and drives streaming ``/v1/chat/completions``
instead (``bench.generate_load.drive``: C clients sharing 4 x C greedy requests of
``--new-tokens`` tokens on the bare base, prompts asking about the fixture reviews), reporting
tokens/s and time to first token idle and while training, and between the two, with no job,
side by side with 2 closed-loop ``/predict`` clients on an encoder adapter (``beside_predict``:
their latency alone and beside generation, generation's tokens/s beside them): the two things
generation's borrowed cores (``service/serving/cores.py``) must be handed back for.
``--generation-threads`` sets ``LORAPLEX_GENERATION_THREADS`` (default: the serving budget,
plus the worker's cores while nothing else computes). Both modes also report the job's
training steps/s with no load (``--seconds`` before the load starts) and under the load.

    python -m bench.serving_under_training --quick --json serving_under_training.json
    python -m bench.serving_under_training --generate --generation-threads 2
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see README)

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import fixture_reviews
from bench.http_load import drive, store_random_adapters
from core.decoder.base import DEFAULT_DECODER_NAME
from core.hardware import bf16_cpu_flags
from service.config import DEFAULT_BASE_MODEL_NAME
from tests.e2e.server import ServerProcess

TARGET_RATIO = 3.0

Load = Callable[[], dict[str, Any]]  # one measurement window's figures


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


def _step(client: Any, job_id: str) -> tuple[str, int, float]:
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    return job["status"], int(job["progress"]["step"] or 0), time.monotonic()


def _steps_per_s(before: tuple[str, int, float], after: tuple[str, int, float]) -> float:
    return round((after[1] - before[1]) / (after[2] - before[2]), 3)


def _predict_load(
    server: ServerProcess, texts: list[str], concurrency: int, seconds: float
) -> Load:
    """``concurrency`` closed-loop /predict clients on one random LoRA adapter for
    ``seconds``."""
    names = store_random_adapters(server.data_dir, 1, prefix="serve")
    url, key = server.base_url, server.api_key
    # Warm-up: the adapter becomes resident, the first batches pay their costs.
    asyncio.run(drive(url, key, names, texts, 2, 3.0))
    return lambda: asyncio.run(drive(url, key, names, texts, concurrency, seconds))


def _generation_load(
    server: ServerProcess, texts: list[str], concurrency: int, new_tokens: int
) -> Load:
    """``concurrency`` streaming chat-completion clients on the bare decoder, 4 x that many
    requests in all."""
    from bench.generate_load import drive as drive_generation

    chats = [[{"role": "user", "content": f"What does this review say? {t}"}] for t in texts[:64]]
    c = concurrency
    return lambda: asyncio.run(
        drive_generation(server, [DEFAULT_DECODER_NAME], chats, c, 4 * c, new_tokens)
    )


def _beside_predict(server: ServerProcess, texts: list[str], generate: Load) -> dict[str, Any]:
    """2 closed-loop /predict clients alone, then beside the generation load (no job): what
    generation's threads do to another tenant's encoder requests, and the reverse."""
    predict = _predict_load(server, texts, concurrency=2, seconds=20.0)
    alone = predict()
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(predict()))
    thread.start()
    generation = generate()
    thread.join()
    figures = {
        "predict_alone": alone,
        "predict_beside_generation": result,
        "generation_beside_predict": generation,
        "predict_p99_ratio": round(result["p99_ms"] / alone["p99_ms"], 2),
    }
    print(f"[sut] beside /predict: {figures}", file=sys.stderr, flush=True)
    return figures


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = fixture_reviews()
    texts = [r["text"] for r in rows]
    settings: dict[str, Any] = {"checkpoint_every_steps": 50}
    if args.serve_threads:
        settings["torch_threads"] = args.serve_threads
    if args.train_threads:
        settings["train_threads"] = args.train_threads
    if args.generate:
        settings["bases"] = f"{DEFAULT_BASE_MODEL_NAME},{DEFAULT_DECODER_NAME}"
        settings["generation_dtype"] = "auto"
        settings["generation_threads"] = args.generation_threads
    with tempfile.TemporaryDirectory(prefix="loraplex-sut-") as tmp:
        server = ServerProcess(Path(tmp), settings=settings).start()
        try:
            if args.generate:
                load = _generation_load(server, texts, args.concurrency, args.new_tokens)
            else:
                load = _predict_load(server, texts, args.concurrency, args.seconds)
            with server.client() as client:
                t0 = time.monotonic()
                idle = load()
                idle["seconds"] = round(time.monotonic() - t0, 1)
                print(f"[sut] idle: {idle}", file=sys.stderr, flush=True)
                beside = _beside_predict(server, texts, load) if args.generate else None

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
                alone0 = _step(client, job_id)
                time.sleep(args.seconds)  # the job with no load: its steps/s to compare
                before = _step(client, job_id)
                training = load()
                after = _step(client, job_id)
                training["seconds"] = round(after[2] - before[2], 1)
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
    figures: dict[str, Any] = {
        "mode": "generate" if args.generate else "predict",
        "cores": os.cpu_count(),
        "cpu_bf16_flags": bf16_cpu_flags(),
        "concurrency": args.concurrency,
        "serving_threads": serving_threads,
        "training_threads": (started.get("data") or {}).get("threads"),
        "idle": idle,
        "training": training,
        "job_ran_through_window": before[0] == after[0] == "running" and after[1] > before[1],
        "train_steps_per_s_alone": _steps_per_s(alone0, before),
        "train_steps_per_s_under_load": _steps_per_s(before, after),
        "server_errors_logged": log.count("unhandled error on"),
    }
    if args.generate:
        figures["generation_threads"] = args.generation_threads  # None: the default
        figures["beside_predict"] = beside
        figures["tok_s_ratio"] = round(training["output_tok_s"] / idle["output_tok_s"], 2)
        figures["ttft_p50_ratio"] = round(training["ttft_p50_ms"] / idle["ttft_p50_ms"], 2)
        return figures
    ratio = training["p99_ms"] / idle["p99_ms"] if idle["p99_ms"] else float("nan")
    figures |= {
        "seconds_per_phase": args.seconds,
        "p50_ratio": round(training["p50_ms"] / idle["p50_ms"], 2) if idle["p50_ms"] else None,
        "p99_ratio": round(ratio, 2),
        "target_p99_ratio": TARGET_RATIO,
        "meets_target": training["errors"] == 0 and ratio <= TARGET_RATIO,
    }
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="per phase")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--serve-threads", type=int, default=None)
    parser.add_argument("--train-threads", type=int, default=None)
    parser.add_argument("--generate", action="store_true", help="chat completions on SmolLM2")
    parser.add_argument("--generation-threads", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=64, help="per chat completion")
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
