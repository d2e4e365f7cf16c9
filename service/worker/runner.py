"""The worker loop: reap expired leases, claim the next queued job on its bases, run it, repeat.

Run it with ``loraplex worker`` (standalone, any number of them against one database) or let
``loraplex serve`` start one as a child process (the embedded default). A separate process,
not a thread, because training must not starve serving: it gets its own torch thread budget
and its own GIL, and a cancelled or crashed job gives all of its memory back.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
import uuid
from types import FrameType
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.session import db_engine_for, make_sessionmaker
from service.jobs import queue
from service.worker.health import HeartbeatWriter

if TYPE_CHECKING:
    from service.worker.job_run import RunOutcome

logger = logging.getLogger(__name__)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def train_threads(settings: Settings) -> int:
    """Torch threads for training: the setting, else half the cores (the API keeps the rest)."""
    return settings.train_threads or max(1, (os.cpu_count() or 2) // 2)


class Worker:
    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        *,
        worker_id: str | None = None,
    ) -> None:
        from service.bases import load_bases

        self.settings = settings
        self.factory = factory
        self.worker_id = worker_id or default_worker_id()
        self.stop = threading.Event()  # no new jobs; the running one checkpoints and requeues
        # Every configured base, loaded once and shared (frozen) by the jobs this worker runs;
        # it claims only jobs on these bases.
        self.bases = load_bases(settings)
        # Everything alive now (torch, transformers, the bases) lives as long as the process:
        # keep it out of later collections. Without this, the full collection each job ends
        # with (JobRun._free) walks all of it again: 0.46 s per job measured on a 2-core VM,
        # two thirds of a small job's run time.
        gc.collect()
        gc.freeze()

    def run_once(self) -> RunOutcome | None:
        """Reap, claim and run at most one job; how it ended, or None if the queue was empty."""
        from service.worker.job_run import JobRun

        with self.factory() as session:
            for job_id in queue.requeue_expired(
                session, max_attempts=self.settings.max_job_attempts
            ):
                logger.warning("requeued job %s after its lease expired", job_id)
            job = queue.claim_next_job(
                session, self.worker_id, self.settings.lease_seconds, models=list(self.bases)
            )
            if job is None:
                return None
            session.expunge(job)
        logger.info("worker %s claimed job %s", self.worker_id, job.id)
        run = JobRun(
            job,
            factory=self.factory,
            base=self.bases[job.model],
            settings=self.settings,
            worker_id=self.worker_id,
            shutdown=self.stop,
        )
        outcome = run.run()
        logger.info("job %s ended: %s", job.id, outcome)
        return outcome

    def run_forever(self) -> None:
        logger.info("worker %s polling %s", self.worker_id, self.settings.db_url.split("@")[-1])
        while not self.stop.is_set():
            try:
                if self.run_once() is None:
                    self.stop.wait(self.settings.worker_poll_seconds)
            except Exception:  # the database went away for a moment: back off and retry
                logger.exception("worker loop error")
                self.stop.wait(max(self.settings.worker_poll_seconds, 2.0))


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    """An embedded worker stops when the API process that started it is gone."""
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:
            logger.warning("parent process %d exited; worker stopping", parent_pid)
            stop.set()


def run_worker(settings: Settings, worker_id: str | None = None) -> int:
    import torch

    from service.db.migrate import upgrade
    from service.worker.memory import limit_heap_growth

    limit_heap_growth()  # before the first job allocates (see its docstring for the figures)
    torch.set_num_threads(train_threads(settings))
    upgrade(settings.db_url)
    db_engine = db_engine_for(settings)
    worker = Worker(settings, make_sessionmaker(db_engine), worker_id=worker_id)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info(
            "signal %d: finishing up (the running job is checkpointed and requeued)", signum
        )
        worker.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.environ.get("LORAPLEX_PARENT_PID")
    if parent:
        threading.Thread(target=_watch_parent, args=(int(parent), worker.stop), daemon=True).start()
    heartbeat = HeartbeatWriter(
        worker.factory,
        worker.worker_id,
        heartbeat_seconds=settings.heartbeat_seconds,
        lease_seconds=settings.lease_seconds,
    )
    try:
        with heartbeat:  # from here on, `loraplex worker --check` finds this worker alive
            worker.run_forever()
    finally:
        db_engine.dispose()
    return 0
