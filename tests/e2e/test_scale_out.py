"""Scale-out on PostgreSQL with real processes: many workers, many API replicas, one database.

* Queue race: 8 ``loraplex worker`` processes and 200 short jobs; every job runs exactly once.
* SIGKILL a worker mid-job while another runs: the lease expires, the other worker resumes it
  from its last checkpoint (in the database) and it succeeds once.
* Two ``loraplex serve`` replicas: create on A, predict on B; replace and delete on A, and B
  answers the new version / 404 for every later request (bound: 0 s), never 500; jobs created
  on A are visible and cancellable on B.

All on a tiny random BERT (``tiny_model_dir``) so eight processes fit on two cores. Each test
gets its own scratch database; without a reachable PostgreSQL they skip, saying so.
"""

from __future__ import annotations

import io
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from bench.queue_race import analyse, seed_jobs, spawn_worker, stop_workers, wait_all_done
from service.db.models import AdapterRow, Checkpoint, Job, JobEvent, JobStatus
from service.db.session import make_db_engine, make_sessionmaker
from tests.e2e.server import ServerProcess, WorkerProcess
from tests.service.helpers import CLASSIFICATION_ROWS, jsonl, scratch_postgres_database
from tests.tiny_bert import TINY_NAME

pytestmark = pytest.mark.postgres

WAIT_S = 600.0  # generous: two shared cores, other test suites running alongside


@pytest.fixture
def pg_url() -> Iterator[str]:
    with scratch_postgres_database() as url:
        yield url


def wait_for(predicate: Callable[[], Any], timeout: float = WAIT_S, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


# --- many workers, one queue -----------------------------------------------------------------


def test_eight_workers_run_two_hundred_jobs_exactly_once(
    pg_url: str, tiny_model_dir: Path, tmp_path: Path, record_property: Any
) -> None:
    job_ids = seed_jobs(pg_url, 200, max_steps=2)
    start = time.monotonic()
    workers = [
        spawn_worker(f"w{i}", pg_url, tmp_path, tiny_model_dir, lease_seconds=60) for i in range(8)
    ]
    try:
        finished = wait_all_done(pg_url, job_ids, WAIT_S, workers)
        alive = [p.poll() is None for p in workers]
    finally:
        stop_workers(workers)
    report = analyse(pg_url, job_ids, mode="train", workers=8)
    report.wall_s = time.monotonic() - start
    logs = "\n".join((tmp_path / f"w{i}.log").read_text()[-2000:] for i in range(8))
    assert finished, f"not every job finished: {report.summary()}\n{logs}"
    assert all(alive), f"a worker died: {alive}\n{logs}"
    print(report.summary())
    record_property("claims_per_s", round(report.claims_per_s, 2))

    assert report.succeeded == 200 and report.not_succeeded == 0, report.errors
    assert report.claims == 200 and report.jobs_claimed_twice == 0  # each ran exactly once
    assert report.adapters == 200 and report.jobs_with_adapter_count_not_one == 0
    assert report.workers_overlapping == 0  # no worker held two jobs at once
    assert report.workers_used >= 2, report.claims_per_worker
    assert report.ok


# --- SIGKILL mid-job: lease expiry, resume from the database checkpoint ----------------------


def _events(url: str, job_id: str) -> list[tuple[str, dict[str, Any] | None]]:
    db_engine = make_db_engine(url)
    try:
        with make_sessionmaker(db_engine)() as session:
            rows = session.execute(
                select(JobEvent.message, JobEvent.data)
                .where(JobEvent.job_id == job_id)
                .order_by(JobEvent.id)
            ).all()
            return [(r.message, r.data) for r in rows]
    finally:
        db_engine.dispose()


def _job_state(url: str, job_id: str) -> tuple[Job, int | None]:
    """The job and the step of its newest checkpoint (None before the first)."""
    db_engine = make_db_engine(url)
    try:
        with make_sessionmaker(db_engine)() as session:
            job = session.get(Job, job_id)
            assert job is not None
            newest = session.scalar(
                select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job_id)
            )
            return job, newest
    finally:
        db_engine.dispose()


def test_killed_worker_job_is_resumed_by_another_worker_from_its_checkpoint(
    pg_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    (job_id,) = seed_jobs(pg_url, 1, max_steps=400, batch_size=4, prefix="kill")
    settings = {
        "database_url": pg_url,
        "base_model_path": tiny_model_dir,
        "base_model_name": TINY_NAME,
        "train_threads": 1,
        "worker_poll_seconds": 0.2,
        "lease_seconds": 4,
        "heartbeat_seconds": 1,
        "checkpoint_every_steps": 10,
    }
    workers = {
        wid: WorkerProcess(tmp_path, settings, worker_id=wid).start() for wid in ("wa", "wb")
    }
    try:
        # Wait for a claim and a checkpoint in the database, then kill the claimant.
        def running_with_checkpoint() -> str | None:
            job, checkpoints = _job_state(pg_url, job_id)
            assert job.status not in (JobStatus.SUCCEEDED, JobStatus.FAILED), job.status
            running = job.status == JobStatus.RUNNING and checkpoints is not None
            return job.worker_id if running else None

        owner = wait_for(running_with_checkpoint, every=0.05)
        assert owner in workers, f"no checkpoint was written: {_events(pg_url, job_id)}"
        survivor = next(w for w in workers if w != owner)
        workers[owner].signal(signal.SIGKILL)
        assert workers[owner].wait(30) == -signal.SIGKILL
        # The job's own step is its last progress write's, which may trail the checkpoint.
        checkpointed = _job_state(pg_url, job_id)[1]

        def finished() -> bool:
            return _job_state(pg_url, job_id)[0].status in (
                JobStatus.SUCCEEDED,
                JobStatus.FAILED,
                JobStatus.CANCELLED,
            )

        assert wait_for(finished, every=0.5), _events(pg_url, job_id)
        assert workers[survivor].alive()
    finally:
        for w in workers.values():
            w.stop()

    job, _ = _job_state(pg_url, job_id)
    events = _events(pg_url, job_id)
    messages = [m for m, _ in events]
    assert job.status == JobStatus.SUCCEEDED, (job.error, messages)
    assert job.attempts == 1 and job.step == job.total_steps == 400
    claims = [d["worker_id"] for m, d in events if m.startswith("Job started on worker")]
    assert claims == [owner, survivor], messages
    assert any(m.startswith("Worker lost (lease expired); job requeued, retry 1") for m in messages)
    resumed = [d for m, d in events if m.startswith("Resumed from checkpoint at step")]
    assert len(resumed) == 1, messages
    # Checkpoints come every 10 steps and at each epoch's end (5 steps of 4 rows here): the
    # survivor resumed from the newest the killed worker wrote.
    assert resumed[0]["step"] == checkpointed, (resumed, checkpointed)
    assert sum(m.startswith("Job succeeded") for m in messages) == 1
    db_engine = make_db_engine(pg_url)
    try:
        with make_sessionmaker(db_engine)() as session:
            adapters = session.scalars(select(AdapterRow).where(AdapterRow.source_job_id == job_id))
            assert len(adapters.all()) == 1  # written once
    finally:
        db_engine.dispose()


# --- two API replicas ------------------------------------------------------------------------

# After a delete or replace returns, a request that arrives later gets the new state on every
# replica: each request reads the adapter's version from the database. The stated bound:
STALENESS_BOUND_S = 0.0


def _archive(base: Any, seed: int) -> bytes:
    """A loraplex-format zip of a random LoRA adapter (what ``/export?format=loraplex`` gives)."""
    from service.adapters.archive import write_archive
    from service.adapters.store import adapter_row_from
    from service.adapters.transfer import export_files
    from tests.core.inference.helpers import lora

    row = adapter_row_from(lora(base, r=4, seed=seed), base, name="x")
    return write_archive(export_files(row, "loraplex", None))


def _import(client: httpx.Client, name: str, data: bytes) -> dict[str, Any]:
    resp = client.post(
        "/v1/adapters/import",
        data={"name": name},
        files={"file": ("adapter.zip", io.BytesIO(data), "application/zip")},
    )
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def _metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _predict(client: httpx.Client, name: str) -> httpx.Response:
    return client.post(f"/predict?adapter={name}", json={"inputs": ["a good movie", "awful"]})


@pytest.fixture
def replicas(
    pg_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    settings = {
        "database_url": pg_url,
        "base_model_path": tiny_model_dir,
        "base_model_name": TINY_NAME,
        "embedded_worker": "false",
        "torch_threads": 1,
    }
    servers = [ServerProcess(tmp_path_factory.mktemp(f"replica-{n}"), dict(settings)) for n in "ab"]
    # Both start at once on the empty database: migrations and the first-start bootstrap
    # must cope with a concurrent twin.
    errors: list[BaseException] = []

    def start(server: ServerProcess) -> None:
        try:
            server.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, (errors, [s.log_tail() for s in servers])
        yield servers[0], servers[1]
    finally:
        for s in servers:
            s.stop()


def _key(a: ServerProcess, b: ServerProcess) -> str:
    """The bootstrap key, written by whichever replica won the first-start race."""
    for s in (a, b):
        path = s.data_dir / "default_api_key"
        if path.exists():
            return s.api_key
    raise AssertionError("no replica wrote the default key")


def test_two_replicas_share_adapters_and_jobs(
    replicas: tuple[ServerProcess, ServerProcess], tiny_base: Any
) -> None:
    a_srv, b_srv = replicas
    key = _key(a_srv, b_srv)
    with a_srv.client(key) as a, b_srv.client(key) as b:
        # Create on A, predict on B (and on A: both hold it resident now).
        _import(a, "shared", _archive(tiny_base, seed=1))
        first = _predict(b, "shared")
        assert first.status_code == 200, first.text
        assert _predict(a, "shared").status_code == 200
        assert _metric(b, "loraplex_adapter_resident_count") == 1
        assert wait_for(lambda: _metric(b, "loraplex_invalidation_listener_connected") == 1, 60)

        # Replace on A (delete + import under the same name): B serves the new version at once.
        assert a.delete("/v1/adapters/shared").status_code == 200
        v2 = _import(a, "shared", _archive(tiny_base, seed=2))
        assert b.get("/v1/adapters/shared").json()["version"] == v2["version"]
        second = _predict(b, "shared")
        assert second.status_code == 200, second.text
        assert second.json()["predictions"] != first.json()["predictions"]
        # B's copy of version 1 is freed through LISTEN/NOTIFY, not by waiting for the LRU.
        assert wait_for(lambda: _metric(b, "loraplex_adapter_resident_count") == 1, 60)
        assert _metric(b, "loraplex_invalidation_notifications_total") >= 2

        # Delete on A while B is under load: after the delete returns, B answers 404 (bound:
        # STALENESS_BOUND_S), and never 500.
        log: list[tuple[float, int]] = []
        stop = threading.Event()

        def hammer() -> None:
            with b_srv.client(key) as hb:
                while not stop.is_set():
                    sent = time.monotonic()
                    log.append((sent, _predict(hb, "shared").status_code))

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: len(log) >= 10, 60, 0.05)
        assert a.delete("/v1/adapters/shared").status_code == 200
        deleted_at = time.monotonic()
        after = _predict(b, "shared")
        wait_for(lambda: sum(sent > deleted_at for sent, _ in log) >= 10, 60, 0.05)
        stop.set()
        for t in threads:
            t.join()
        assert after.status_code == 404, after.text
        assert after.json()["error"]["code"] == "adapter_not_found"
        statuses = {status for _, status in log}
        assert statuses <= {200, 404}, statuses
        late = [s for sent, s in log if sent > deleted_at + STALENESS_BOUND_S]
        assert late and set(late) == {404}, late
        assert wait_for(lambda: _metric(b, "loraplex_adapter_resident_count") == 0, 60)

        # Jobs: created on A, seen and cancelled on B, and A sees the cancellation.
        upload = a.post(
            "/v1/datasets",
            data={"kind": "classification"},
            files={"file": ("train.jsonl", jsonl(CLASSIFICATION_ROWS), "application/jsonl")},
        )
        assert upload.status_code == 200, upload.text
        job = a.post(
            "/v1/fine_tuning/jobs",
            json={"training_file": upload.json()["id"], "adapter_name": "later"},
        ).json()
        assert b.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "queued"
        assert job["id"] in [j["id"] for j in b.get("/v1/fine_tuning/jobs").json()["data"]]
        cancelled = b.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert a.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "cancelled"
        events = a.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
        assert any("cancelled" in e["message"] for e in events)
