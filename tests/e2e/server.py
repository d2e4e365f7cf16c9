"""Real ``loraplex serve`` / ``loraplex worker`` processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.config import DEFAULT_BASE_MODEL_NAME

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(data_dir: Path, **settings: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["LORAPLEX_DATA_DIR"] = str(data_dir)
    env["LORAPLEX_LOG_LEVEL"] = "WARNING"
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # The encoder alone unless a test asks for more (the decoder would slow every start).
    settings.setdefault("bases", settings.get("base_model_name") or DEFAULT_BASE_MODEL_NAME)
    # Generation in float32 whatever the CPU: tests compare its tokens with transformers'.
    settings.setdefault("generation_dtype", "float32")
    for key, value in settings.items():
        if value is not None:
            env[f"LORAPLEX_{key.upper()}"] = str(value)
    return env


@dataclass
class ServerProcess:
    """One ``loraplex serve`` process on a free loopback port (restartable on the same data)."""

    data_dir: Path
    settings: dict[str, object] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_key(self) -> str:
        return (self.data_dir / "default_api_key").read_text().strip()

    def client(self, key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.api_key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def start(self) -> ServerProcess:
        log = (self.data_dir / f"server-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=REPO,
            env=base_env(self.data_dir, **self.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_ready(self.base_url, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        path = self.data_dir / f"server-{self.port}.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""
        )


def wait_ready(base_url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        # Often enough that bench.startup_bases times a start to 50 ms; a try is cheap: a
        # refused connect until the lifespan is done, then at most a 503 after one SELECT 1.
        time.sleep(0.05)
    raise RuntimeError(f"server at {base_url} not ready after {READY_TIMEOUT_S:.0f} s")


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300.0) -> dict[str, object]:
    """Poll a job until it reaches a terminal status; return the job object."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").raise_for_status().json()
        if job["status"] in {"succeeded", "failed", "cancelled"}:
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s")


@dataclass
class WorkerProcess:
    """One standalone ``loraplex worker`` on the same data directory (or database) as a server.

    ``worker_id`` is passed explicitly, so a test can tell from a job's events which worker
    holds it (``"Job started on worker <id>"``) and signal exactly that process.
    """

    data_dir: Path
    settings: dict[str, object] = field(default_factory=dict)
    worker_id: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"worker-{self.worker_id}.log"

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "worker", "--worker-id", self.worker_id],
            cwd=REPO,
            env=base_env(self.data_dir, **self.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss_bytes(self) -> int:
        """Resident set size from /proc (no psutil needed)."""
        return rss_bytes(self.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def status_kib(pid: int, field: str) -> int:
    """A memory field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``...), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def rss_bytes(pid: int) -> int:
    return status_kib(pid, "VmRSS") * 1024
