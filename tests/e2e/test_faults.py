"""Fault tolerance with real processes: signals sent to real workers and a real API server.

One ``loraplex serve`` (no embedded worker) and standalone ``loraplex worker`` processes share
a SQLite file. Leases are short (4 s, heartbeat 1 s) so a dead worker's job is reaped quickly,
and checkpoints are written every 4 steps. Every worker trains with one torch thread: resume
is bit-exact on CPU only for the same thread count.

Scenarios (each a test, in this order; they share the server and a pool of workers):

1. SIGKILL the worker mid-training → the lease expires, another worker resumes from the last
   checkpoint and finishes with the same metrics and weights as an uninterrupted run of the
   same job (tolerance 1e-6; in practice they are bit-identical); one adapter row.
2. SIGSTOP the worker past its lease (a "zombie"), let another worker take over and finish,
   then SIGCONT the zombie → it notices the lost lease and writes nothing: still one adapter,
   no events after the job's end.
3. SIGTERM the worker mid-training → it checkpoints, requeues the job (no attempt counted)
   and exits 0; another worker resumes from that checkpoint.
4. Cancel a queued job (never starts) and a running ``full`` fine-tune: the worker's RSS drops
   by most of what the job had allocated (read from /proc, no psutil).
5. SIGKILL the API in the middle of a streamed upload while a job trains on a worker → after
   a restart no partial dataset exists, and every dataset, job, event and adapter is kept
   (the job the worker finished meanwhile included).
6. The default deployment (``serve`` with its embedded worker): SIGKILL the worker child →
   the supervisor starts another, which resumes the job after the lease expires; SIGTERM the
   server → the worker checkpoints and requeues, both exit; the next start finishes it.

No assertion is about time: deadlines only bound the waits.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors.torch import load as st_load

from tests.e2e.conftest import load_jsonl
from tests.e2e.server import ServerProcess, WorkerProcess, wait_job

pytestmark = pytest.mark.real_model

LEASE_S = 4
SETTINGS: dict[str, object] = {
    "embedded_worker": False,
    "lease_seconds": LEASE_S,
    "heartbeat_seconds": 1,
    "checkpoint_every_steps": 4,
    "worker_poll_seconds": 0.5,
    "train_threads": 1,
    "torch_threads": 1,
    "max_job_attempts": 5,
}
WORKER_SETTINGS = {**SETTINGS, "log_level": "INFO"}
# LoRA with dropout: resume must restore the RNG too, or the dropout masks would differ.
LORA = {
    "type": "lora",
    "lora": {"r": 4, "dropout": 0.1},
    "hyperparameters": {
        "max_steps": 24,
        "batch_size": 8,
        "learning_rate": 2e-3,
        "eval_every_steps": 8,
        "max_seq_length": 64,
    },
}
METRIC_TOLERANCE = 1e-6
WEIGHT_TOLERANCE = 1e-6
WAIT_S = 240.0


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("faults"), settings=SETTINGS)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


class Pool:
    """Worker processes of this module, by worker id; all stopped at the end."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.workers: dict[str, WorkerProcess] = {}

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if w.alive()]

    def ensure(self, n: int) -> list[WorkerProcess]:
        """At least ``n`` live workers, each past loading the model (polling the queue)."""
        while len(self.alive()) < n:
            wid = f"w{len(self.workers) + 1}-{uuid.uuid4().hex[:4]}"
            self.workers[wid] = WorkerProcess(self.data_dir, WORKER_SETTINGS, worker_id=wid).start()
        for w in self.alive():
            _until(lambda w=w: "polling" in w.log() or not w.alive(), f"{w.worker_id} ready")
            assert w.alive(), w.log()[-3000:]
        return self.alive()

    def exactly(self, n: int) -> list[WorkerProcess]:
        """Exactly ``n`` live workers: extras (left by an earlier scenario) are stopped, so a
        job can only land on the workers a test is watching."""
        for extra in self.alive()[n:]:
            extra.stop()
        return self.ensure(n)

    def stop_all(self) -> None:
        for w in self.workers.values():
            w.stop()


@pytest.fixture(scope="module")
def pool(server: ServerProcess) -> Iterator[Pool]:
    p = Pool(server.data_dir)
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def files(client: httpx.Client) -> tuple[str, str]:
    rows = load_jsonl("rotten_tomatoes_small.jsonl")
    ids = []
    for name, part in (("train", rows[:128]), ("val", rows[400:432])):
        resp = client.post(
            "/v1/datasets", json={"kind": "classification", "name": name, "records": part}
        )
        assert resp.status_code == 200, resp.text
        ids.append(resp.json()["id"])
    return ids[0], ids[1]


# --- helpers ---------------------------------------------------------------------------------


def _until(cond: Callable[[], Any], what: str, timeout: float = WAIT_S, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"waited {timeout:.0f} s for: {what}")


def _submit(
    client: httpx.Client, files: tuple[str, str], name: str, method: dict[str, Any] | None = None
) -> str:
    resp = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "training_file": files[0],
            "validation_file": files[1],
            "adapter_name": name,
            "seed": 1234,
            "method": method or LORA,
        },
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


def _events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """All events, oldest first."""
    out: list[dict[str, Any]] = []
    after = None
    while True:
        params: dict[str, Any] = {"order": "asc", "limit": 100}
        if after:
            params["after"] = after
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        out += page["data"]
        if not page["has_more"]:
            return out
        after = page["last_id"]


def _holder(client: httpx.Client, job_id: str) -> str | None:
    """The worker that started the job most recently (from its events)."""
    starts = [
        e["data"]["worker_id"]
        for e in _events(client, job_id)
        if e["message"].startswith("Job started on worker")
    ]
    return starts[-1] if starts else None


def _checkpoints(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]


def _job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    return client.get(f"/v1/fine_tuning/jobs/{job_id}").json()


def _adapter_rows(server: ServerProcess, job_id: str) -> int:
    with sqlite3.connect(f"file:{server.data_dir / 'loraplex.db'}?mode=ro", uri=True) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM adapters WHERE source_job_id = ?", (job_id,)
        ).fetchone()
    return int(count)


def _stop_outside_a_write(server: ServerProcess, worker: WorkerProcess) -> None:
    """SIGSTOP ``worker`` at a moment it holds no SQLite write lock: stopped inside a write
    transaction (a heartbeat, a progress row, a checkpoint) it would keep every other process
    from writing until it resumes, the reaper and the worker taking over included, which no
    lease can undo (see the README's failure table). Retried a few ms later if it did."""
    db = server.data_dir / "loraplex.db"
    for _ in range(100):
        worker.signal(signal.SIGSTOP)
        conn = sqlite3.connect(db, timeout=0.2, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")  # takes the write lock, or finds it held
            conn.execute("ROLLBACK")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
        finally:
            conn.close()
        worker.signal(signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the worker held the database's write lock at 100 tries")


def _weights(client: httpx.Client, name: str) -> dict[str, Any]:
    resp = client.get(f"/v1/adapters/{name}/export", params={"format": "loraplex"})
    assert resp.status_code == 200, resp.text
    with zipfile.ZipFile(BytesIO(resp.content)) as zf:
        (member,) = [n for n in zf.namelist() if n.endswith(".safetensors")]
        return st_load(zf.read(member))


def _messages(events: list[dict[str, Any]]) -> list[str]:
    return [e["message"] for e in events]


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "steps_per_second"
    }


# --- 1. SIGKILL mid-training -----------------------------------------------------------------


def test_sigkill_mid_training_resumes_to_the_same_result(
    server: ServerProcess, pool: Pool, client: httpx.Client, files: tuple[str, str]
) -> None:
    workers = {w.worker_id: w for w in pool.ensure(2)}
    job_id = _submit(client, files, "resumed")
    ckpt = _until(lambda: _checkpoints(client, job_id), "a first checkpoint")[0]
    victim = workers[_until(lambda: _holder(client, job_id), "the job's worker")]
    victim.signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    killed_at = _job(client, job_id)
    # Nothing has noticed the death yet: the lease (renewed every second) runs for 4 s.
    assert killed_at["status"] == "running", killed_at
    assert killed_at["progress"]["step"] < killed_at["progress"]["total_steps"]

    # The same job again, uninterrupted, on the surviving worker.
    clean_id = _submit(client, files, "uninterrupted")
    resumed = wait_job(client, job_id, WAIT_S)
    clean = wait_job(client, clean_id, WAIT_S)
    assert resumed["status"] == clean["status"] == "succeeded", (resumed, clean)

    messages = _messages(_events(client, job_id))
    assert any(m.startswith("Worker lost (lease expired); job requeued, retry 1") for m in messages)
    assert any(m.endswith("(retry 1)") and "Job started on worker" in m for m in messages)
    resumed_from = [m for m in messages if m.startswith("Resumed from checkpoint at step")]
    assert len(resumed_from) == 1
    step = int(resumed_from[0].rsplit(" ", 1)[1])
    assert step >= ckpt["step_number"] and step % 4 == 0
    clean_events = _events(client, clean_id)
    assert not any("Resumed" in m or "Worker lost" in m for m in _messages(clean_events))
    # Training ran on its own thread budget (LORAPLEX_TRAIN_THREADS), not the machine's.
    (started,) = [e for e in clean_events if e["message"].startswith("Training lora")]
    assert started["data"]["threads"] == SETTINGS["train_threads"]

    # Same seed, same data, same thread count: the same metrics and the same weights.
    got, want = _scalar_metrics(resumed["metrics"]), _scalar_metrics(clean["metrics"])
    assert got.keys() == want.keys() and {"val_loss", "val_accuracy", "train_loss"} <= got.keys()
    for key in want:
        assert abs(got[key] - want[key]) <= METRIC_TOLERANCE, (key, got[key], want[key])
    a, b = _weights(client, "resumed"), _weights(client, "uninterrupted")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"\nresume vs uninterrupted: max |Δweight| = {worst:.3g}, metrics {got}")
    assert worst <= WEIGHT_TOLERANCE

    # Exactly one adapter row for the job, whatever happened to it.
    assert _adapter_rows(server, job_id) == 1
    assert [a["name"] for a in client.get("/v1/adapters").json()["data"]].count("resumed") == 1


# --- 2. a stalled worker comes back after losing its lease -------------------------------------


def test_stalled_worker_that_lost_its_lease_writes_nothing(
    server: ServerProcess, pool: Pool, client: httpx.Client, files: tuple[str, str]
) -> None:
    workers = {w.worker_id: w for w in pool.ensure(2)}
    job_id = _submit(client, files, "zombie")
    _until(lambda: _checkpoints(client, job_id), "a first checkpoint")
    zombie = workers[_until(lambda: _holder(client, job_id), "the job's worker")]
    _stop_outside_a_write(server, zombie)
    try:
        job = wait_job(client, job_id, WAIT_S)
        assert job["status"] == "succeeded", job
        assert _holder(client, job_id) != zombie.worker_id
    finally:
        zombie.signal(signal.SIGCONT)
    events_at_end = _events(client, job_id)
    # The zombie resumes its step, finds its lease gone at the next database write, stops.
    _until(lambda: f"job {job_id} ended: lease_lost" in zombie.log(), "the zombie to give up")
    assert zombie.alive(), "a lost lease ends the job's run, not the worker"
    assert _adapter_rows(server, job_id) == 1
    after = wait_job(client, job_id, 5)
    assert after["status"] == "succeeded" and after["fine_tuned_adapter"] == "zombie"
    assert _events(client, job_id) == events_at_end, "no events from the stale worker"


# --- 3. SIGTERM: checkpoint, requeue, exit 0 ---------------------------------------------------


def test_sigterm_checkpoints_requeues_and_exits_zero(
    server: ServerProcess, pool: Pool, client: httpx.Client, files: tuple[str, str]
) -> None:
    workers = {w.worker_id: w for w in pool.ensure(2)}
    # Long enough that the signal surely lands mid-training: progress reaches the database at
    # most once a second, so a short job can finish between two polls on a fast machine.
    longer = {**LORA, "hyperparameters": {**LORA["hyperparameters"], "max_steps": 96}}
    job_id = _submit(client, files, "graceful", longer)

    def mid_training() -> bool:
        job = _job(client, job_id)
        return job["status"] == "running" and 2 <= job["progress"]["step"] <= 48

    _until(mid_training, "the job to be mid-training", every=0.05)
    holder = workers[_until(lambda: _holder(client, job_id), "the job's worker")]
    holder.signal(signal.SIGTERM)
    assert holder.wait(60) == 0, holder.log()[-3000:]
    assert "requeue" in holder.log() or "finishing up" in holder.log()

    job = wait_job(client, job_id, WAIT_S)
    assert job["status"] == "succeeded", job
    events = _events(client, job_id)
    messages = _messages(events)
    i = messages.index("Job requeued: worker shutting down")
    # A checkpoint's event is a message (OpenAI's type) with the checkpoint in its data.
    saved = [e for e in events[:i] if (e["data"] or {}).get("checkpoint_id")]
    assert saved, "a checkpoint was saved before the job was given back"
    shutdown_step = saved[-1]["data"]["step"]
    resumed = [m for m in messages[i:] if m.startswith("Resumed from checkpoint at step")]
    assert resumed == [f"Resumed from checkpoint at step {shutdown_step}"]
    # A graceful hand-back is not a lost worker: no attempt counted, no lease expiry.
    assert not any("Worker lost" in m or "(retry" in m for m in messages)
    assert _adapter_rows(server, job_id) == 1


# --- 4. cancel: queued at once; running frees its memory ---------------------------------------


def test_cancel_queued_and_running_jobs_frees_memory(
    server: ServerProcess, pool: Pool, client: httpx.Client, files: tuple[str, str]
) -> None:
    (worker,) = pool.exactly(1)
    base = client.get("/v1/models").json()["data"][0]
    assert base["kind"] == "base"
    n_params = int(base["num_params"])

    idle_rss = worker.rss_bytes()
    full = {
        "type": "full",
        "hyperparameters": {"n_epochs": 50, "batch_size": 8, "max_seq_length": 64},
    }
    running_id = _submit(client, files, "full-cancelled", full)
    queued_id = _submit(client, files, "queued-cancelled")
    _until(lambda: _job(client, running_id)["progress"]["step"] >= 2, "two steps of full")

    # The queued job is cancelled at once and never starts.
    resp = client.post(f"/v1/fine_tuning/jobs/{queued_id}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled", resp.text

    peak_rss = 0
    for _ in range(5):
        peak_rss = max(peak_rss, worker.rss_bytes())
        time.sleep(0.2)
    resp = client.post(f"/v1/fine_tuning/jobs/{running_id}/cancel")
    assert resp.status_code == 200
    assert resp.json()["status"] in ("cancel_requested", "cancelled")
    job = wait_job(client, running_id, 60)
    assert job["status"] == "cancelled" and job["fine_tuned_adapter"] is None
    assert _adapter_rows(server, running_id) == 0

    grown = peak_rss - idle_rss
    # Full fine-tuning holds at least a trainable copy of the encoder plus Adam's two moments:
    # 12 bytes a parameter. Most of that must be given back once the job is cancelled.
    assert grown >= 8 * n_params, (idle_rss, peak_rss)

    def released() -> int | None:
        rss = worker.rss_bytes()
        return rss if peak_rss - rss >= 0.75 * grown else None

    try:
        after_rss = _until(released, "the worker to give the job's memory back", 60, 0.5)
    except TimeoutError:
        after_rss = worker.rss_bytes()
    mib = 1 << 20
    print(
        f"\nworker RSS: idle {idle_rss / mib:.0f} MiB, training full {peak_rss / mib:.0f} MiB, "
        f"after cancel {after_rss / mib:.0f} MiB ({n_params / 1e6:.1f} M params)"
    )
    assert peak_rss - after_rss >= 0.75 * grown

    assert _events(client, queued_id)[-1]["message"] == "Job cancelled before it started"
    assert not any(m.startswith("Job started") for m in _messages(_events(client, queued_id)))
    again = client.post(f"/v1/fine_tuning/jobs/{queued_id}/cancel")
    assert again.status_code == 409


# --- 5. the API killed mid-upload (and while a worker trains) ----------------------------------


def _snapshot(client: httpx.Client) -> dict[str, Any]:
    jobs = client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
    return {
        "datasets": client.get("/v1/datasets", params={"limit": 100}).json()["data"],
        "adapters": client.get("/v1/adapters", params={"limit": 100}).json()["data"],
        "jobs": {j["id"]: j for j in jobs},
        "events": {j["id"]: _events(client, j["id"]) for j in jobs},
    }


def test_api_killed_mid_upload_leaves_no_partial_dataset_and_restart_keeps_all(
    server: ServerProcess, pool: Pool, client: httpx.Client, files: tuple[str, str]
) -> None:
    (worker,) = pool.exactly(1)
    training_id = _submit(client, files, "trained-while-api-down")
    _until(lambda: _job(client, training_id)["status"] == "running", "the job to start")
    before = _snapshot(client)

    boundary = "loraplexfaulttest"
    row = b'{"text": "a slowly uploaded review", "label": "pos"}\n'
    sent = threading.Event()

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="kind"\r\n\r\n'
            f"classification\r\n--{boundary}\r\nContent-Disposition: form-data; "
            f'name="file"; filename="slow.jsonl"\r\nContent-Type: application/jsonl\r\n\r\n'
        ).encode()
        for i in range(10_000):
            yield row * 200
            if i == 5:
                sent.set()
            time.sleep(0.05)
        yield f"\r\n--{boundary}--\r\n".encode()

    outcome: dict[str, Any] = {}

    def upload() -> None:
        try:
            outcome["response"] = httpx.post(
                f"{server.base_url}/v1/datasets",
                content=body(),
                headers={
                    "Authorization": f"Bearer {server.api_key}",
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                },
                timeout=60,
            )
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=upload)
    thread.start()
    assert sent.wait(60)
    server.stop(signal.SIGKILL)
    thread.join(60)
    assert "error" in outcome, outcome  # the connection died with the server

    # The worker does not need the API: the job finishes while it is down.
    assert worker.alive()
    server.start()
    job = wait_job(client, training_id, WAIT_S)
    assert job["status"] == "succeeded", job
    after = _snapshot(client)

    assert after["datasets"] == before["datasets"], "no partial dataset, none lost"
    assert {a["name"] for a in after["adapters"]} == {a["name"] for a in before["adapters"]} | {
        "trained-while-api-down"
    }
    assert after["jobs"].keys() == before["jobs"].keys()
    for job_id, old in before["jobs"].items():
        if job_id != training_id:
            assert after["jobs"][job_id] == old
            assert after["events"][job_id] == before["events"][job_id]
    # The running job's events before the kill are all still there, in order.
    kept = before["events"][training_id]
    assert after["events"][training_id][: len(kept)] == kept
    assert _adapter_rows(server, training_id) == 1

    # Graceful shutdown of an idle worker: it stops polling and exits 0 at once.
    worker.signal(signal.SIGTERM)
    assert worker.wait(60) == 0


# --- 6. the default deployment: serve with its embedded worker ---------------------------------


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _embedded_worker_pid(server: ServerProcess) -> int | None:
    assert server.proc is not None
    pids = _children(server.proc.pid)
    return pids[0] if len(pids) == 1 else None


def test_embedded_worker_crash_and_server_sigterm(
    server: ServerProcess, pool: Pool, client: httpx.Client, files: tuple[str, str]
) -> None:
    """``loraplex serve`` with its embedded worker: SIGKILL the worker child → the supervisor
    starts a new one, which resumes the job; SIGTERM the server → the worker checkpoints and
    requeues, both exit; the next start finishes the job."""
    pool.stop_all()
    server.stop()
    server.settings = {**SETTINGS, "embedded_worker": True}
    server.start()
    longer = {**LORA, "hyperparameters": {**LORA["hyperparameters"], "max_steps": 64}}
    job_id = _submit(client, files, "embedded", longer)
    _until(lambda: _checkpoints(client, job_id), "a first checkpoint")
    first = _until(lambda: _embedded_worker_pid(server), "the embedded worker")
    os.kill(first, signal.SIGKILL)

    def resumed_and_stepping() -> bool:
        events = _events(client, job_id)
        i = next((k for k, e in enumerate(events) if e["message"].startswith("Resumed from")), None)
        return i is not None and any(e["type"] == "metrics" for e in events[i:])

    _until(resumed_and_stepping, "a new embedded worker to resume the job")
    second = _embedded_worker_pid(server)
    assert second is not None and second != first

    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM (a clean
    # exit for systemd and Kubernetes), or 0 if a later uvicorn stops doing that.
    assert server.proc.wait(90) in (0, -signal.SIGTERM), server.log_tail()
    assert not Path(f"/proc/{second}").exists(), "the embedded worker went with the server"

    server.start()
    job = wait_job(client, job_id, WAIT_S)
    assert job["status"] == "succeeded", job
    messages = _messages(_events(client, job_id))
    assert any(m.startswith("Worker lost (lease expired)") for m in messages)
    i = messages.index("Job requeued: worker shutting down")
    assert len([m for m in messages if m.startswith("Resumed from checkpoint")]) == 2
    assert any(m.startswith("Resumed from checkpoint") for m in messages[i:])
    assert _adapter_rows(server, job_id) == 1
