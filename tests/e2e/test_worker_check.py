"""``loraplex worker --check`` against a real ``loraplex worker`` process on SQLite.

What a worker container's health check sees: unhealthy before the worker is up, healthy
while it runs, unhealthy within a lease once it stalls (SIGSTOP), and at once after it stops.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.server import REPO, WorkerProcess, base_env

# Short, so a stalled worker turns unhealthy within seconds.
SETTINGS = {"heartbeat_seconds": 0.5, "lease_seconds": 3}
WAIT_S = 180.0  # the worker loads the base model before its first heartbeat


def _check(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "worker", "--check", *args],
        cwd=REPO,
        env=base_env(data_dir, **SETTINGS),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _wait_for(data_dir: Path, returncode: int, worker: WorkerProcess) -> str:
    """Poll the check until it exits ``returncode``; its one line of output."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        result = _check(data_dir)
        if result.returncode == returncode:
            lines = (result.stdout + result.stderr).splitlines()
            assert len(lines) == 1, lines
            return lines[0]
        time.sleep(0.5)
    raise AssertionError(f"check never exited {returncode}; worker log:\n{worker.log()[-3000:]}")


def test_worker_check_follows_a_real_worker(tmp_path: Path) -> None:
    worker = WorkerProcess(tmp_path, dict(SETTINGS), worker_id="w-health")
    before = _check(tmp_path)
    assert before.returncode == 1
    assert before.stderr.startswith("loraplex: no database at ")
    worker.start()
    try:
        line = _wait_for(tmp_path, 0, worker)
        assert line.startswith(f"worker 'w-health' (pid {worker.pid} on ")
        assert _check(tmp_path, "--worker-id", "w-health").returncode == 0
        other = _check(tmp_path, "--worker-id", "w-other")
        assert (other.returncode, other.stderr) == (
            1,
            "loraplex: no heartbeat from worker 'w-other': is `loraplex worker` running?\n",
        )

        worker.signal(signal.SIGSTOP)  # alive but stalled: no more heartbeats
        line = _wait_for(tmp_path, 1, worker)
        assert line.startswith("loraplex: worker 'w-health' last reported ")
        assert line.endswith("longer than a lease (LORAPLEX_LEASE_SECONDS=3)")

        worker.signal(signal.SIGCONT)
        _wait_for(tmp_path, 0, worker)
    finally:
        worker.stop()
    assert worker.wait() == 0
    after = _check(tmp_path)
    assert after.returncode == 1
    assert after.stderr.startswith("loraplex: no heartbeat from a worker on host ")
