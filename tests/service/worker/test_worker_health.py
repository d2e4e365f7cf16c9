"""A worker's heartbeat row and ``loraplex worker --check``'s verdict on it, on both dialects.

The real process (``loraplex worker`` writing its row, ``--check`` in another process) is
tested in tests/e2e/test_worker_check.py; these cover each verdict directly.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.models import WorkerHeartbeat
from service.db.types import utcnow
from service.worker.health import HeartbeatWriter, check, diagnose
from tests.service.conftest import make_settings


def _writer(db: sessionmaker[Session], settings: Settings, worker_id: str) -> HeartbeatWriter:
    return HeartbeatWriter(
        db,
        worker_id,
        heartbeat_seconds=settings.heartbeat_seconds,
        lease_seconds=settings.lease_seconds,
    )


def _rows(db: sessionmaker[Session]) -> dict[str, WorkerHeartbeat]:
    with db() as session:
        return {row.id: row for row in session.scalars(select(WorkerHeartbeat))}


def _age_row(db: sessionmaker[Session], worker_id: str, seconds: float) -> None:
    with db() as session:
        session.execute(
            update(WorkerHeartbeat)
            .where(WorkerHeartbeat.id == worker_id)
            .values(last_seen_at=utcnow() - timedelta(seconds=seconds))
        )
        session.commit()


def test_a_running_worker_is_healthy_and_gone_once_it_stops(
    settings: Settings, migrated_db: sessionmaker[Session], capsys: pytest.CaptureFixture[str]
) -> None:
    assert diagnose(settings) == (
        False,
        f"no heartbeat from a worker on host {socket.gethostname()!r}: "
        "is `loraplex worker` running?",
    )
    with _writer(migrated_db, settings, "w1"):
        row = _rows(migrated_db)["w1"]
        assert (row.hostname, row.pid) == (socket.gethostname(), os.getpid())
        assert check(settings) == 0
        assert check(settings, worker_id="w1") == 0
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 2 and all(line.startswith("worker 'w1' (pid ") for line in out)
        healthy, line = diagnose(settings, worker_id="w2")
        assert (healthy, line) == (
            False,
            "no heartbeat from worker 'w2': is `loraplex worker` running?",
        )
    assert _rows(migrated_db) == {}  # a clean stop removes the row: the check fails at once
    assert check(settings) == 1
    err = capsys.readouterr().err
    assert err.startswith("loraplex: no heartbeat from a worker on host") and err.count("\n") == 1


def test_a_worker_silent_for_a_lease_is_unhealthy(
    settings: Settings, migrated_db: sessionmaker[Session]
) -> None:
    with _writer(migrated_db, settings, "w1"):
        _age_row(migrated_db, "w1", settings.lease_seconds - 5)
        assert diagnose(settings)[0] is True
        _age_row(migrated_db, "w1", settings.lease_seconds + 5)
        healthy, line = diagnose(settings)
        assert not healthy
        assert line == (
            f"worker 'w1' last reported {settings.lease_seconds + 5:.0f} s ago, longer than a "
            f"lease (LORAPLEX_LEASE_SECONDS={settings.lease_seconds:g})"
        )
        # Its next beat makes it healthy again.
        _writer(migrated_db, settings, "w1").beat()
        assert diagnose(settings)[0] is True


def _add_row(db: sessionmaker[Session], worker_id: str, hostname: str, age_s: float) -> None:
    """A row as another process (on ``hostname``) would have left it ``age_s`` ago."""
    seen = utcnow() - timedelta(seconds=age_s)
    with db() as session:
        session.add(
            WorkerHeartbeat(
                id=worker_id, hostname=hostname, pid=7, started_at=seen, last_seen_at=seen
            )
        )
        session.commit()


def test_only_workers_on_this_host_count_unless_one_is_named(
    settings: Settings, migrated_db: sessionmaker[Session]
) -> None:
    _add_row(migrated_db, "far", "elsewhere", 0)
    assert diagnose(settings)[0] is False
    assert diagnose(settings, worker_id="far")[0] is True


def test_a_starting_worker_prunes_the_rows_of_dead_workers(
    settings: Settings, migrated_db: sessionmaker[Session]
) -> None:
    _add_row(migrated_db, "dead", "elsewhere", settings.lease_seconds + 1)
    _add_row(migrated_db, "quiet", "elsewhere", settings.lease_seconds - 5)
    with _writer(migrated_db, settings, "new"):
        assert set(_rows(migrated_db)) == {"quiet", "new"}


def test_a_worker_whose_row_was_pruned_writes_it_again(
    settings: Settings, migrated_db: sessionmaker[Session]
) -> None:
    with _writer(migrated_db, settings, "w1") as writer:
        # What a starting worker does to a row silent for a lease (a network partition).
        with migrated_db() as session:
            session.execute(delete(WorkerHeartbeat))
            session.commit()
        assert diagnose(settings)[0] is False
        writer.beat()
        assert set(_rows(migrated_db)) == {"w1"}
        assert diagnose(settings)[0] is True


def test_the_check_never_creates_a_sqlite_database(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    healthy, line = diagnose(settings)
    assert not healthy
    assert line == (
        f"no database at {str(tmp_path / 'data' / 'loraplex.db')!r}: "
        "no worker has started with these settings"
    )
    assert not (tmp_path / "data").exists()


def test_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    healthy, line = diagnose(settings)
    assert not healthy
    assert line.startswith("cannot read worker heartbeats from the database: ")
    assert "\n" not in line
