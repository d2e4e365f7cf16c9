"""Noisy neighbour: what tenant A's heaviest legal traffic does to tenant B, same server.

Starts ``loraplex serve`` the default way (real MiniLM, embedded worker, SQLite in a temp dir)
with an admin key, creates tenants A and B through ``/v1/tenants``, stores one random LoRA
adapter for each, then measures B's one-text ``/predict`` latency (one client, sequential
requests, T seconds) in four phases:

1. idle;
2. while A floods ``/predict`` with the largest request the server accepts (``MAX_INPUTS``
   texts sharing ``LORAPLEX_MAX_REQUEST_CHARS`` characters), C clients closed loop; before it,
   how fast a request over that bound is refused (413) and that its refusal is one;
3. while A uploads the largest JSON dataset body ``LORAPLEX_MAX_UPLOAD_MB`` allows to
   ``/v1/datasets`` (records of real reviews), C clients closed loop;
4. while A's long training jobs run and queue on the worker: B creates a short job, and its
   wait (creation to ``running``, polled every 0.25 s) is reported with how many of A's
   queued jobs started before it (fair share across tenants: none should).

Each phase reports B's p50/p95/p99, the p50 and p99 ratios to idle, and what A's load
achieved (requests, statuses). What A's own maximal request costs is timed alone on the idle
server (``a_alone``): with fair scheduling it runs as many small batches. Client and server
share the machine's cores, so A's client takes some of the server's CPU as well; figures are
for comparing phases of one run.

    python -m bench.noisy_neighbour --quick --json noisy_neighbour.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see README)

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.common import fixture_reviews
from bench.http_load import drive, store_random_adapters, summarize
from service.api.schemas.inference import MAX_INPUTS, MAX_TEXT_CHARS
from service.config import Settings
from tests.e2e.server import ServerProcess

ADMIN_KEY = "noisy-neighbour-bench-admin-key"
POLL_S = 0.25


def long_text(texts: list[str], chars: int) -> str:
    """Real review text, repeated and cut to exactly ``chars`` characters."""
    joined = " ".join(texts)
    return (joined * (chars // len(joined) + 1))[:chars]


def predict_body(texts: list[str], total_chars: int) -> bytes:
    """``MAX_INPUTS`` texts holding ``total_chars`` characters between them (each at most
    ``MAX_TEXT_CHARS``, the schema's own bound), JSON-encoded once: A's client then spends
    no CPU re-encoding it."""
    per_text = min(MAX_TEXT_CHARS, total_chars // MAX_INPUTS)
    return json.dumps({"inputs": [long_text(texts, per_text)] * MAX_INPUTS}).encode()


def dataset_body(rows: list[dict[str, str]], max_bytes: int, max_rows: int) -> bytes:
    """The largest ``{"kind": "classification", "records": [...]}`` body of real review rows
    that stays under ``max_bytes`` (the upload bound) and ``max_rows``."""
    head = b'{"kind": "classification", "records": ['
    encoded = [json.dumps(r).encode() for r in rows]
    parts, size = [], len(head) + 2
    while len(parts) < max_rows:
        row = encoded[len(parts) % len(encoded)]
        if size + len(row) + 2 > max_bytes:
            break
        parts.append(row)
        size += len(row) + 2
    return head + b", ".join(parts) + b"]}"


class Flood:
    """Tenant A's load: ``concurrency`` clients posting one fixed body in a closed loop, on a
    thread with its own event loop (B's measuring loop never waits behind A's sends). With
    ``retry_after``, a client refused with 503 waits the Retry-After it was given, as the
    OpenAI SDK does, instead of resending at once."""

    def __init__(
        self,
        url: str,
        key: str,
        path: str,
        body: bytes,
        concurrency: int,
        retry_after: bool = False,
    ) -> None:
        self.url, self.key, self.path, self.body = url, key, path, body
        self.concurrency, self.retry_after = concurrency, retry_after
        self.statuses: Counter[str] = Counter()
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._started = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Future[Any] | None = None

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=300) as client:

            async def one() -> None:
                while not self._stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        r = await client.post(self.path, content=self.body)
                        self.statuses[str(r.status_code)] += 1
                        wait = float(r.headers.get("Retry-After", 1)) if r.status_code == 503 else 0
                    except httpx.HTTPError as e:
                        self.statuses[type(e).__name__] += 1
                        wait = 0
                    self.latencies.append(time.perf_counter() - t0)
                    if self.retry_after and wait:
                        await asyncio.sleep(wait)

            self._task = asyncio.gather(*(one() for _ in range(self.concurrency)))
            # Stopped with requests in flight: their connections are closed.
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def __enter__(self) -> Flood:
        self._started = time.monotonic()
        self._thread.start()
        time.sleep(1.0)  # A's first requests are in flight before B measures
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        # A maximal request can take many seconds: cancel those in flight, don't wait.
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join()

    def figures(self) -> dict[str, Any]:
        row = summarize(self.latencies, 0, time.monotonic() - self._started)
        del row["errors"]
        return {
            "body_bytes": len(self.body),
            "concurrency": self.concurrency,
            **row,
            "statuses": dict(self.statuses),
        }


def settle(client: httpx.Client, path: str, idle_p50_ms: float, timeout: float) -> float:
    """Seconds until one of B's requests is back near idle (under 3x its idle p50): the
    server may still be computing requests A's cancelled clients left behind."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        t0 = time.perf_counter()
        client.post(path, json={"inputs": ["a fine film"]})
        if (time.perf_counter() - t0) * 1000 < 3 * idle_p50_ms:
            break
        time.sleep(0.5)
    return round(time.monotonic() - start, 1)


def timed_refusals(client: httpx.Client, path: str, body: bytes, n: int) -> dict[str, Any]:
    """``n`` sequential over-limit requests: their statuses and how long a refusal takes."""
    latencies, statuses = [], Counter[str]()
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
        latencies.append(time.perf_counter() - t0)
        statuses[str(r.status_code)] += 1
        error = r.json().get("error", {})
    row = summarize(latencies, 0, sum(latencies))
    return {
        "body_bytes": len(body),
        "requests": n,
        "p50_ms": row["p50_ms"],
        "p99_ms": row["p99_ms"],
        "statuses": dict(statuses),
        "error_code": error.get("code"),
        "error_param": error.get("param"),
    }


def create_tenant(server: ServerProcess, name: str) -> str:
    with server.client(ADMIN_KEY) as admin:
        r = admin.post("/v1/tenants", json={"name": name})
        r.raise_for_status()
        return str(r.json()["api_key"]["key"])


def job_body(file_id: str, name: str, steps: int) -> dict[str, Any]:
    return {
        "training_file": file_id,
        "adapter_name": name,
        "seed": 1,
        "method": {
            "type": "lora",
            "lora": {"r": 8},
            "hyperparameters": {"max_steps": steps, "batch_size": 16, "max_seq_length": 64},
        },
    }


class RunningWatch:
    """Polls jobs every ``POLL_S`` and keeps when each was first seen out of ``queued``."""

    def __init__(self, server: ServerProcess, keys: dict[str, str]) -> None:
        self.server, self.keys = server, keys  # job id -> its tenant's key
        self.first_running: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        clients: dict[str, httpx.Client] = {}  # B's key joins once B's job exists
        try:
            while not self._stop.is_set():
                for job_id, key in list(self.keys.items()):
                    if job_id in self.first_running:
                        continue
                    if key not in clients:
                        clients[key] = self.server.client(key)
                    status = clients[key].get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]
                    if status not in {"queued", "validating_files"}:
                        self.first_running[job_id] = time.monotonic()
                time.sleep(POLL_S)
        finally:
            for c in clients.values():
                c.close()

    def wait_for(self, job_id: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while job_id not in self.first_running and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return self.first_running.get(job_id)

    def __enter__(self) -> RunningWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def jobs_phase(
    server: ServerProcess, keys: dict[str, str], measure: Any, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A's long jobs (one running, the rest queued), then B's short job: B's latency while
    A trains, and B's wait for the worker."""
    rows = fixture_reviews()
    a, b = server.client(keys["a"]), server.client(keys["b"])
    try:
        a_file = a.post("/v1/datasets", json={"kind": "classification", "records": rows[:400]})
        b_file = b.post("/v1/datasets", json={"kind": "classification", "records": rows[:64]})
        a_jobs = []
        for i in range(args.a_jobs):
            r = a.post(
                "/v1/fine_tuning/jobs",
                json=job_body(a_file.raise_for_status().json()["id"], f"a-long-{i}", args.a_steps),
            )
            a_jobs.append(r.raise_for_status().json()["id"])
        with RunningWatch(server, dict.fromkeys(a_jobs, keys["a"])) as watch:
            print("[noisy] A's jobs created", file=sys.stderr, flush=True)
            if watch.wait_for(a_jobs[0], 300) is None:
                raise RuntimeError("A's first job never started")
            running_before_b = set(watch.first_running)
            r = b.post(
                "/v1/fine_tuning/jobs",
                json=job_body(b_file.raise_for_status().json()["id"], "b-short", 2),
            )
            b_created, b_job = time.monotonic(), r.raise_for_status().json()["id"]
            watch.keys[b_job] = keys["b"]
            latency = measure()
            b_started = watch.wait_for(b_job, args.job_wait_timeout)
            a_status = [a.get(f"/v1/fine_tuning/jobs/{j}").json()["status"] for j in a_jobs]
        for j in a_jobs:
            a.post(f"/v1/fine_tuning/jobs/{j}/cancel")
        b.post(f"/v1/fine_tuning/jobs/{b_job}/cancel")
    finally:
        a.close()
        b.close()
    queued_a = [j for j in a_jobs if j not in running_before_b]
    started_first = [
        j
        for j in queued_a
        if j in watch.first_running and (b_started is None or watch.first_running[j] < b_started)
    ]
    wait = {
        "a_jobs": args.a_jobs,
        "a_steps_per_job": args.a_steps,
        "a_jobs_running_when_b_created": len(running_before_b),
        "a_jobs_queued_when_b_created": len(queued_a),
        "a_queued_jobs_started_before_b": len(started_first),
        "b_wait_s": round(b_started - b_created, 2) if b_started is not None else None,
        "b_wait_timeout_s": args.job_wait_timeout,
        "a_job_statuses_after": dict(Counter(a_status)),
    }
    return latency, wait


def run(args: argparse.Namespace) -> dict[str, Any]:
    reviews = fixture_reviews()
    texts = [r["text"] for r in reviews]
    max_chars = args.max_request_chars or Settings.model_fields["max_request_chars"].default
    settings: dict[str, Any] = {
        "admin_key": ADMIN_KEY,
        "max_upload_mb": args.upload_mb,
        "max_request_chars": max_chars,
    }
    accepted = predict_body(texts, max_chars)
    over = predict_body(texts, max_chars + MAX_INPUTS)  # one character more per text
    upload = dataset_body(
        reviews,
        args.upload_mb * 1024 * 1024 - 4096,  # headroom for the multipart-free JSON framing
        Settings.model_fields["max_dataset_rows"].default,
    )
    phases: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="loraplex-noisy-") as tmp:
        server = ServerProcess(Path(tmp), settings=settings).start()
        try:
            keys = {t: create_tenant(server, f"bench-{t}") for t in ("a", "b")}
            a_name = store_random_adapters(server.data_dir, 1, "a", keys["a"])[0]
            b_name = store_random_adapters(server.data_dir, 1, "b", keys["b"])[0]
            a_path = f"/predict?adapter={a_name}"

            def measure() -> dict[str, Any]:
                url, key = server.base_url, keys["b"]
                return asyncio.run(drive(url, key, [b_name], texts, 1, args.seconds))

            def flood(path: str, body: bytes) -> Flood:
                return Flood(server.base_url, keys["a"], path, body, args.concurrency)

            with server.client(keys["a"], timeout=300) as a:
                # Warm-up: both adapters resident; A's large request, timed alone.
                asyncio.run(drive(server.base_url, keys["b"], [b_name], texts, 1, 2.0))
                t0 = time.perf_counter()
                r = a.post(a_path, content=accepted, headers={"Content-Type": "application/json"})
                a_alone_s = time.perf_counter() - t0
                r.raise_for_status()
                a_alone = {
                    "rows": MAX_INPUTS,
                    "seconds": round(a_alone_s, 2),
                    "rows_per_s": round(MAX_INPUTS / a_alone_s, 1),
                }
                print(f"[noisy] A's maximal /predict alone: {a_alone}", file=sys.stderr, flush=True)
                phases["idle"] = measure()
                print(f"[noisy] idle: {phases['idle']}", file=sys.stderr, flush=True)
                refused = timed_refusals(a, a_path, over, args.refusals)
                print(f"[noisy] over-limit /predict: {refused}", file=sys.stderr, flush=True)
            for name, path, body in (
                ("a_max_predict", a_path, accepted),
                ("a_max_dataset_upload", "/v1/datasets", upload),
            ):
                with flood(path, body) as f:
                    phases[name] = measure()
                phases[name]["a_load"] = f.figures()
                with server.client(keys["b"], timeout=300) as b:
                    b_path = f"/predict?adapter={b_name}"
                    phases[name]["settle_s"] = settle(b, b_path, phases["idle"]["p50_ms"], 180)
                print(f"[noisy] {name}: {phases[name]}", file=sys.stderr, flush=True)
            phases["a_long_jobs"], job_wait = jobs_phase(server, keys, measure, args)
            print(f"[noisy] a_long_jobs: {phases['a_long_jobs']}", file=sys.stderr, flush=True)
            print(f"[noisy] job wait: {job_wait}", file=sys.stderr, flush=True)
            log = (server.data_dir / f"server-{server.port}.log").read_text(errors="replace")
        finally:
            server.stop()
    idle = phases["idle"]
    for row in phases.values():
        row["p50_ratio"] = round(row["p50_ms"] / idle["p50_ms"], 2)
        row["p99_ratio"] = round(row["p99_ms"] / idle["p99_ms"], 2)
    return {
        "cores": os.cpu_count(),
        "seconds_per_phase": args.seconds,
        "a_concurrency": args.concurrency,
        "max_request_chars": max_chars,
        "max_upload_mb": args.upload_mb,
        "a_alone": a_alone,
        "phases": phases,
        "over_limit_predict": refused,
        "job_wait": job_wait,
        "server_errors_logged": log.count("unhandled error on"),
    }


def print_table(figures: dict[str, Any]) -> None:
    print(
        f"\n{'B /predict while':<24}{'req':>6}{'p50':>8}{'p95':>8}{'p99':>8}{'err':>5}"
        f"{'p50 x':>9}{'p99 x':>9}  A's load"
    )
    for name, r in figures["phases"].items():
        a = r.get("a_load")
        a_txt = (
            f"{a['requests']} req of {a['body_bytes'] / 1e6:.1f} MB, p50 {a['p50_ms']} ms, "
            f"{a['statuses']}"
            if a
            else ""
        )
        print(
            f"{name:<24}{r['requests']:>6}{r['p50_ms']:>8}{r['p95_ms']:>8}{r['p99_ms']:>8}"
            f"{r['errors']:>5}{r['p50_ratio']:>9}{r['p99_ratio']:>9}  {a_txt}"
        )
    alone = figures["a_alone"]
    print(
        f"A's maximal /predict alone ({alone['rows']} texts): {alone['seconds']} s, "
        f"{alone['rows_per_s']} rows/s"
    )
    o, w = figures["over_limit_predict"], figures["job_wait"]
    print(
        f"over-limit /predict ({o['body_bytes'] / 1e6:.1f} MB): {o['statuses']} "
        f"({o['error_code']}, param {o['error_param']}), p50 {o['p50_ms']} ms, "
        f"p99 {o['p99_ms']} ms"
    )
    print(
        f"B's job wait with A's {w['a_jobs']} jobs of {w['a_steps_per_job']} steps "
        f"({w['a_jobs_running_when_b_created']} running, {w['a_jobs_queued_when_b_created']} "
        f"queued): {w['b_wait_s']} s; A's queued jobs that started first: "
        f"{w['a_queued_jobs_started_before_b']}"
    )
    print(f"server errors logged: {figures['server_errors_logged']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="per phase")
    parser.add_argument("--concurrency", type=int, default=4, help="A's clients per flood")
    parser.add_argument(
        "--upload-mb", type=int, default=Settings.model_fields["max_upload_mb"].default
    )
    parser.add_argument("--max-request-chars", type=int, default=None, help="server default")
    parser.add_argument("--refusals", type=int, default=10, help="over-limit requests timed")
    parser.add_argument("--a-jobs", type=int, default=4)
    parser.add_argument("--a-steps", type=int, default=200, help="steps per A job")
    parser.add_argument("--job-wait-timeout", type=float, default=600.0)
    parser.add_argument("--quick", action="store_true", help="short phases, small jobs (~2 min)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.upload_mb, args.refusals, args.concurrency = 8.0, 8, 3, 2
        args.a_jobs, args.a_steps, args.job_wait_timeout = 3, 10, 90.0
    figures = run(args)
    print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
