"""Queue race: N worker processes, M jobs, one database. Every job must run exactly once.

Two modes:

* ``train`` (default): N real ``loraplex worker`` processes (``python -m service worker``) on
  a tiny random BERT, M real fine-tuning jobs of a few LoRA steps on ~20 rows. The figure is
  the system's claim rate with real jobs: claims/s = M / (last claim - first claim).
* ``queue``: N processes that only claim a job and finish it with a small fake adapter
  (``service.jobs.queue`` calls, no torch): the job queue's own capacity.

Either way the outcome is checked from the database: every job succeeded, exactly one claim
per job (no job ran twice, none was lost), exactly one adapter per job, and no worker held two
jobs at once. PostgreSQL by default (a scratch database on ``LPX_TEST_POSTGRES_URL``, dropped
afterwards); ``--url sqlite:///file.db`` for the single-box comparison.

    python -m bench.queue_race                      # 8 workers x 200 jobs, train mode
    python -m bench.queue_race --mode queue --workers 8 --jobs 2000
    python -m bench.queue_race --quick --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from tests.postgres import scratch_database

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    {"text": f"{adj} movie number {i}", "label": label}
    for i in range(10)
    for adj, label in (("a good", "pos"), ("a bad", "neg"))
]


# --- databases -------------------------------------------------------------------------------


def seed_jobs(
    url: str,
    n_jobs: int,
    *,
    max_steps: int = 2,
    batch_size: int = 8,
    rows: list[dict[str, str]] | None = None,
    base_model_name: str = "loraplex-tests/tiny-bert",
    prefix: str = "race",
) -> list[str]:
    """Migrate ``url``; add a tenant, one dataset and ``n_jobs`` queued jobs (the API's code)."""
    import hashlib

    from service.api.schemas.jobs import JobCreate
    from service.config import Settings
    from service.datasets import codec
    from service.db.migrate import upgrade
    from service.db.models import Dataset, Tenant
    from service.db.session import make_db_engine, make_sessionmaker
    from service.jobs.create import create_job

    rows = rows or ROWS
    upgrade(url)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=url,
        base_model_name=base_model_name,
        max_concurrent_jobs_per_tenant=n_jobs + 1,
        max_queued_jobs_per_tenant=n_jobs + 1,
        max_adapters_per_tenant=n_jobs + 1,
    )
    db_engine = make_db_engine(url)
    ids: list[str] = []
    try:
        factory = make_sessionmaker(db_engine)
        with factory() as session:
            tenant = Tenant(name=f"{prefix}-{uuid.uuid4().hex[:6]}")
            session.add(tenant)
            session.flush()
            labels = Counter(r["label"] for r in rows)
            raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
            dataset = Dataset(
                tenant_id=tenant.id,
                name="race.jsonl",
                kind="classification",
                rows=codec.encode_rows(rows),
                rows_encoding=codec.ENCODING,
                row_count=len(rows),
                label_counts=dict(labels),
                bytes=len(raw),
                sha256=hashlib.sha256(raw).hexdigest(),
            )
            session.add(dataset)
            session.commit()
            for i in range(n_jobs):
                body = JobCreate.model_validate(
                    {
                        "training_file": dataset.id,
                        "adapter_name": f"{prefix}-{i:05d}",
                        "seed": i,
                        "method": {
                            "type": "lora",
                            "lora": {"r": 2},
                            "hyperparameters": {"max_steps": max_steps, "batch_size": batch_size},
                        },
                    }
                )
                ids.append(create_job(session, tenant, body.job_request(), settings).id)
    finally:
        db_engine.dispose()
    return ids


# --- workers ---------------------------------------------------------------------------------


def worker_env(url: str, data_dir: Path, model_dir: Path | None, **settings: Any) -> dict[str, str]:
    from service.config import DEFAULT_BASE_MODEL_NAME

    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env |= {
        "LORAPLEX_DATABASE_URL": url,
        "LORAPLEX_DATA_DIR": str(data_dir),
        "LORAPLEX_TRAIN_THREADS": "1",
        "LORAPLEX_WORKER_POLL_SECONDS": "0.2",
        "LORAPLEX_LOG_LEVEL": "WARNING",
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    if model_dir is not None:
        env["LORAPLEX_BASE_MODEL_PATH"] = str(model_dir)
        env["LORAPLEX_BASE_MODEL_NAME"] = "loraplex-tests/tiny-bert"
    # The encoder alone: the jobs here train on it, and a worker loads every listed base.
    env["LORAPLEX_BASES"] = env.get("LORAPLEX_BASE_MODEL_NAME", DEFAULT_BASE_MODEL_NAME)
    for key, value in settings.items():
        env[f"LORAPLEX_{key.upper()}"] = str(value)
    return env


def spawn_worker(
    worker_id: str, url: str, data_dir: Path, model_dir: Path | None, **settings: Any
) -> subprocess.Popen[bytes]:
    """One ``python -m service worker --worker-id worker_id``; its log in data_dir."""
    log = (data_dir / f"{worker_id}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "service", "worker", "--worker-id", worker_id],
        cwd=ROOT,
        env=worker_env(url, data_dir, model_dir, **settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def stop_workers(procs: list[subprocess.Popen[bytes]], timeout: float = 60.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _queue_only_worker(url: str, worker_id: str, lease_seconds: float) -> None:
    """``--mode queue``: claim, finish with a 64-byte fake adapter, repeat until empty."""
    from sqlalchemy import select

    from service.db.models import AdapterRow, Job, JobStatus
    from service.db.session import make_db_engine, make_sessionmaker
    from service.jobs import outcomes, queue

    db_engine = make_db_engine(url, pool_size=1)
    factory = make_sessionmaker(db_engine)
    try:
        while True:
            with factory() as session:
                job = queue.claim_next_job(session, worker_id, lease_seconds)
                if job is None:
                    left = session.scalar(select(Job.id).where(Job.status == JobStatus.QUEUED))
                    session.rollback()
                    if left is None:
                        return
                    continue
                row = AdapterRow(
                    method="lora",
                    task="classification",
                    config={"fake": True},
                    weights=b"\0" * 64,
                    label_names=["neg", "pos"],
                    trainable_params=1,
                    trainable_pct=0.0,
                    size_bytes=64,
                    base_model="fake",
                    base_fingerprint="fake",
                )
                outcomes.finish_success(session, job, row, worker_id=worker_id, metrics={})
    finally:
        db_engine.dispose()


# --- checking the outcome --------------------------------------------------------------------


@dataclass
class RaceReport:
    backend: str
    mode: str
    workers: int
    jobs: int
    succeeded: int = 0
    not_succeeded: int = 0  # lost or failed
    claims: int = 0
    jobs_claimed_twice: int = 0
    adapters: int = 0
    jobs_with_adapter_count_not_one: int = 0
    workers_overlapping: int = 0  # a worker holding two jobs at once
    workers_used: int = 0
    claims_per_worker: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # "status: message" of the others
    claim_span_s: float = 0.0
    claims_per_s: float = 0.0
    finish_span_s: float = 0.0
    jobs_per_s: float = 0.0
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.succeeded == self.jobs
            and self.not_succeeded == 0
            and self.claims == self.jobs
            and self.jobs_claimed_twice == 0
            and self.adapters == self.jobs
            and self.jobs_with_adapter_count_not_one == 0
            and self.workers_overlapping == 0
        )

    def summary(self) -> str:
        return (
            f"{self.backend} {self.mode}: {self.workers} workers x {self.jobs} jobs: "
            f"{self.succeeded} succeeded, {self.claims} claims "
            f"({self.jobs_claimed_twice} jobs claimed twice, {self.not_succeeded} lost/failed), "
            f"{self.adapters} adapters, {self.workers_used} workers used; "
            f"{self.claims_per_s:.1f} claims/s over {self.claim_span_s:.1f} s, "
            f"{self.jobs_per_s:.1f} jobs/s end to end; wall {self.wall_s:.1f} s"
        )


def done_count(url: str, job_ids: list[str]) -> int:
    from sqlalchemy import func, select

    from service.db.models import TERMINAL_STATUSES, Job
    from service.db.session import make_db_engine

    db_engine = make_db_engine(url)
    try:
        with db_engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.id.in_(job_ids), Job.status.in_(TERMINAL_STATUSES))
                ).scalar_one()
            )
    finally:
        db_engine.dispose()


def wait_all_done(
    url: str,
    job_ids: list[str],
    timeout: float,
    procs: list[subprocess.Popen[bytes]] | None = None,
) -> bool:
    """Poll until every job is terminal (False on timeout, or when every worker died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done_count(url, job_ids) == len(job_ids):
            return True
        if procs and all(p.poll() is not None for p in procs):
            return done_count(url, job_ids) == len(job_ids)
        time.sleep(0.5)
    return False


def analyse(url: str, job_ids: list[str], *, mode: str, workers: int) -> RaceReport:
    """Read the outcome back from the database (events are the claim log)."""
    from sqlalchemy import func, select

    from service.db.models import AdapterRow, Job, JobEvent, JobStatus
    from service.db.session import make_db_engine, make_sessionmaker

    db_engine = make_db_engine(url)
    report = RaceReport(
        backend=db_engine.dialect.name, mode=mode, workers=workers, jobs=len(job_ids)
    )
    try:
        with make_sessionmaker(db_engine)() as session:
            jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(job_ids)))}
            claims = session.execute(
                select(JobEvent.job_id, JobEvent.created_at, JobEvent.data)
                .where(JobEvent.job_id.in_(job_ids), JobEvent.message.like("Job started on %"))
                .order_by(JobEvent.id)
            ).all()
            per_job_adapters = dict(
                session.execute(
                    select(AdapterRow.source_job_id, func.count())
                    .where(AdapterRow.source_job_id.in_(job_ids))
                    .group_by(AdapterRow.source_job_id)
                ).all()
            )
    finally:
        db_engine.dispose()

    report.succeeded = sum(j.status == JobStatus.SUCCEEDED for j in jobs.values())
    report.not_succeeded = len(job_ids) - report.succeeded
    report.errors = dict(
        Counter(
            f"{j.status}: {(j.error or {}).get('message', '')}"[:200]
            for j in jobs.values()
            if j.status != JobStatus.SUCCEEDED
        )
    )
    report.claims = len(claims)
    claims_per_job = Counter(c.job_id for c in claims)
    report.jobs_claimed_twice = sum(n > 1 for n in claims_per_job.values())
    report.adapters = sum(per_job_adapters.values())
    report.jobs_with_adapter_count_not_one = sum(per_job_adapters.get(j, 0) != 1 for j in job_ids)
    by_worker: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
    for c in claims:
        job = jobs.get(c.job_id)
        by_worker[(c.data or {}).get("worker_id", "?")].append(
            (c.created_at, job.finished_at if job is not None else None)
        )
    report.claims_per_worker = {w: len(v) for w, v in sorted(by_worker.items())}
    report.workers_used = len(by_worker)
    slack = timedelta(milliseconds=10)
    for spans in by_worker.values():
        spans.sort(key=lambda s: s[0])
        for (_, prev_end), (next_start, _) in itertools.pairwise(spans):
            if prev_end is None or next_start + slack < prev_end:
                report.workers_overlapping += 1
                break
    if claims:
        times = [c.created_at for c in claims]
        report.claim_span_s = (max(times) - min(times)).total_seconds()
        report.claims_per_s = len(claims) / max(report.claim_span_s, 1e-6)
        ends = [j.finished_at for j in jobs.values() if j.finished_at is not None]
        if ends:
            report.finish_span_s = (max(ends) - min(times)).total_seconds()
            report.jobs_per_s = report.succeeded / max(report.finish_span_s, 1e-6)
    return report


# --- one race --------------------------------------------------------------------------------


def run_race(
    url: str,
    *,
    workers: int,
    jobs: int,
    mode: str = "train",
    max_steps: int = 2,
    model_dir: Path | None = None,
    data_dir: Path | None = None,
    timeout: float = 900.0,
) -> RaceReport:
    """Seed ``jobs`` jobs on ``url``, let ``workers`` processes race for them, report."""
    job_ids = seed_jobs(url, jobs, max_steps=max_steps)
    start = time.monotonic()
    if mode == "queue":
        ctx = multiprocessing.get_context("spawn")
        procs_q = [
            ctx.Process(target=_queue_only_worker, args=(url, f"q{i}", 60.0))
            for i in range(workers)
        ]
        for p in procs_q:
            p.start()
        for p in procs_q:
            p.join(timeout)
    else:
        with contextlib.ExitStack() as stack:
            if data_dir is None:
                data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            if model_dir is None:
                from tests.tiny_bert import build_tiny_bert

                model_dir = build_tiny_bert(data_dir / "tiny-bert")
            procs = [
                spawn_worker(f"w{i}", url, data_dir, model_dir, lease_seconds=60)
                for i in range(workers)
            ]
            try:
                wait_all_done(url, job_ids, timeout, procs)
            finally:
                stop_workers(procs)
    report = analyse(url, job_ids, mode=mode, workers=workers)
    report.wall_s = time.monotonic() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--mode", choices=("train", "queue"), default="train")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per job (train)")
    parser.add_argument(
        "--url",
        help="database to race on (default: a scratch PostgreSQL database on "
        "LPX_TEST_POSTGRES_URL, dropped afterwards); sqlite:///x.db for SQLite",
    )
    parser.add_argument("--quick", action="store_true", help="4 workers x 40 jobs")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.jobs = 4, 40

    def race(url: str) -> RaceReport:
        return run_race(
            url, workers=args.workers, jobs=args.jobs, mode=args.mode, max_steps=args.steps
        )

    if args.url:
        report = race(args.url)
    else:
        with scratch_database() as url:
            report = race(url)
    print(report.summary())
    print("claims per worker:", report.claims_per_worker)
    if report.errors:
        print("not succeeded:", report.errors)
    if args.json:
        Path(args.json).write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
