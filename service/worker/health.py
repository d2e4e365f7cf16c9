"""A worker's health signal: its heartbeat row in the database, and ``loraplex worker --check``.

A worker serves no HTTP, so a container cannot probe it the way it probes the API. Every
worker process keeps its row in ``worker_heartbeats`` fresh instead (every
``heartbeat_seconds``, the cadence of its job leases, from a thread of its own so a long
training step does not silence it) and deletes the row when it stops. ``loraplex worker
--check`` exits 0 when the worker named by ``--worker-id``, or else any worker on this host,
wrote its row within ``lease_seconds``: the silence after which the queue hands a worker's
job to another.

The database rather than a file in the data dir: the row goes over the connection the worker
needs for every job, so a worker cut off from its database turns unhealthy, and standalone
workers on PostgreSQL share no data dir (nor, across machines, any disk).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from datetime import timedelta
from pathlib import Path
from types import TracebackType

from sqlalchemy import delete, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from service.config import Settings
from service.db.models import WorkerHeartbeat
from service.db.session import make_db_engine
from service.db.types import utcnow

logger = logging.getLogger(__name__)

# A container's health check runs on the worker's own host (``check`` looks workers up by
# hostname), so the worker and its check read one clock: this machine's. The rows' times are
# never compared across machines, unlike job leases (see ``service.jobs.queue``).


class HeartbeatWriter:
    """Keeps this process's ``worker_heartbeats`` row fresh while the ``with`` block runs."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        worker_id: str,
        *,
        heartbeat_seconds: float,
        lease_seconds: float,
    ) -> None:
        self._factory = factory
        self._worker_id = worker_id
        self._interval = heartbeat_seconds
        self._lease_seconds = lease_seconds
        self._started_at = utcnow()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{worker_id}", daemon=True
        )

    def __enter__(self) -> HeartbeatWriter:
        with self._factory() as session:
            # Rows of workers that died without deleting theirs: silent for a whole lease,
            # they are gone by the queue's own rule. A live worker silenced that long (a
            # network partition) writes its row anew with its next beat.
            cutoff = utcnow() - timedelta(seconds=self._lease_seconds)
            session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.last_seen_at < cutoff))
            session.commit()
        self.beat()  # the row exists once the worker is ready, not an interval later
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        try:
            with self._factory() as session:
                session.execute(
                    delete(WorkerHeartbeat).where(WorkerHeartbeat.id == self._worker_id)
                )
                session.commit()
        except SQLAlchemyError as error:  # the row ages out; the check then reports it stale
            logger.warning(
                "could not remove the heartbeat of worker %s: %s", self._worker_id, error
            )

    def beat(self) -> None:
        now = utcnow()
        with self._factory() as session:
            result = session.execute(
                update(WorkerHeartbeat)
                .where(WorkerHeartbeat.id == self._worker_id)
                .values(last_seen_at=now)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 0:  # type: ignore[attr-defined]
                session.add(
                    WorkerHeartbeat(
                        id=self._worker_id,
                        hostname=socket.gethostname(),
                        pid=os.getpid(),
                        started_at=self._started_at,
                        last_seen_at=now,
                    )
                )
            session.commit()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except SQLAlchemyError as error:  # a database hiccup: the next beat tries again
                logger.warning("heartbeat of worker %s failed: %s", self._worker_id, error)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _latest(settings: Settings, worker_id: str | None, hostname: str) -> WorkerHeartbeat | None:
    query = select(WorkerHeartbeat).order_by(WorkerHeartbeat.last_seen_at.desc()).limit(1)
    if worker_id is not None:
        query = query.where(WorkerHeartbeat.id == worker_id)
    else:
        query = query.where(WorkerHeartbeat.hostname == hostname)
    db_engine = make_db_engine(settings.db_url, poolclass=NullPool)
    try:
        with Session(db_engine) as session:
            return session.scalars(query).first()
    finally:
        db_engine.dispose()


def diagnose(settings: Settings, worker_id: str | None = None) -> tuple[bool, str]:
    """Whether the worker (``worker_id``, else any on this host) is alive, and one line why."""
    hostname = socket.gethostname()
    who = f"worker {worker_id!r}" if worker_id is not None else f"a worker on host {hostname!r}"
    url = make_url(settings.db_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        # Opening it would create an empty database: a health check must not write.
        return False, f"no database at {url.database!r}: no worker has started with these settings"
    try:
        row = _latest(settings, worker_id, hostname)
    except SQLAlchemyError as error:
        return False, f"cannot read worker heartbeats from the database: {_first_line(error)}"
    if row is None:
        return False, f"no heartbeat from {who}: is `loraplex worker` running?"
    age = (utcnow() - row.last_seen_at).total_seconds()
    if age > settings.lease_seconds:
        return False, (
            f"worker {row.id!r} last reported {age:.0f} s ago, longer than a lease "
            f"(LORAPLEX_LEASE_SECONDS={settings.lease_seconds:g})"
        )
    return True, f"worker {row.id!r} (pid {row.pid} on {row.hostname}) reported {age:.1f} s ago"


def check(settings: Settings, worker_id: str | None = None) -> int:
    """``loraplex worker --check``: print one line; 0 when healthy, 1 when not."""
    healthy, line = diagnose(settings, worker_id)
    if healthy:
        print(line)
        return 0
    print(f"loraplex: {line}", file=sys.stderr)
    return 1
