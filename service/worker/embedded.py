"""``loraplex serve``'s embedded worker: a supervised child process running ``loraplex worker``.

The child gets the parent's settings through ``LORAPLEX_*`` variables and watches the parent's
pid, so it never outlives the API. If it dies (a crash, the OOM killer), the supervisor starts
a new one after a short back-off; the dead worker's job is requeued when its lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from service.config import Settings
from service.state import AppState

logger = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
STOP_TIMEOUT_S = 30.0


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as ``LORAPLEX_*`` variables, so a child process sees the same config."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, list):  # read back comma-separated (LORAPLEX_BASES)
            value = ",".join(value)
        env[f"LORAPLEX_{name.upper()}"] = str(value)
    return env


def _spawn(settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings_env(settings), "LORAPLEX_PARENT_PID": str(os.getpid())}
    return subprocess.Popen([sys.executable, "-m", "service", "worker"], env=env)


@asynccontextmanager
async def embedded_worker(state: AppState) -> AsyncIterator[None]:
    settings = state.settings
    if not settings.embedded_worker:
        yield
        return
    readiness = state.readiness
    readiness.expect("worker")
    worker: dict[str, subprocess.Popen[bytes]] = {"proc": _spawn(settings)}
    state.worker_pid = worker["proc"].pid
    readiness.ready("worker")

    async def supervise() -> None:
        failures = 0
        while True:
            await asyncio.sleep(1.0)
            code = worker["proc"].poll()
            if code is None:
                continue
            readiness.expect("worker")
            state.worker_pid = None
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            logger.error("embedded worker exited with %s; restarting in %.0f s", code, delay)
            failures += 1
            await asyncio.sleep(delay)
            worker["proc"] = _spawn(settings)
            state.worker_pid = worker["proc"].pid
            readiness.ready("worker")

    task = asyncio.create_task(supervise())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        proc = worker["proc"]
        state.worker_pid = None
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: the worker checkpoints and requeues its running job
            try:
                await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.error("embedded worker did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
                proc.kill()
                await asyncio.to_thread(proc.wait)
