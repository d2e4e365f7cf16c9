"""A job's lease, kept alive from a background thread while the training thread works.

Every ``heartbeat_seconds`` the keeper extends the lease, so a long step or validation never
lets it expire. (The cancel flag is not read here: the training loop reads it before every
step, see ``JobRun._should_cancel``, since a heartbeat apart is many steps of a fast job.)

Self-fencing: if no heartbeat has succeeded for a whole lease (the database is unreachable
from this worker, or the process was stalled), another worker may already have taken the job
over, so the keeper declares the lease lost and the job stops without writing anything more.
Every worker-side write is fenced by ``worker_id`` in the database as well; this only keeps a
partitioned worker from training on uselessly.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from service.jobs import queue

logger = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self,
        factory: sessionmaker[Session],
        job_id: str,
        worker_id: str,
        *,
        lease_seconds: float,
        heartbeat_seconds: float,
    ) -> None:
        self._factory = factory
        self._job_id = job_id
        self._worker_id = worker_id
        self._lease_seconds = lease_seconds
        self._interval = heartbeat_seconds
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last_ok = time.monotonic()  # the claim itself set the lease just before we started
        while not self._stop.wait(self._interval):
            try:
                with self._factory() as session:
                    alive = queue.heartbeat(
                        session, self._job_id, self._worker_id, self._lease_seconds
                    )
            except Exception:  # a database hiccup: try again next beat, the lease has slack
                logger.exception("heartbeat for job %s failed", self._job_id)
                if time.monotonic() - last_ok >= self._lease_seconds:
                    logger.warning(
                        "no heartbeat for job %s succeeded for %.0f s (the lease); stopping it",
                        self._job_id,
                        self._lease_seconds,
                    )
                    self.lost.set()
                    return
                continue
            last_ok = time.monotonic()
            if not alive:
                logger.warning("lease on job %s lost; stopping it", self._job_id)
                self.lost.set()
                return
