"""Engine set-up and column types."""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from service.cli import main
from service.db.models import ApiKey, Tenant
from service.db.session import (
    db_engine_for,
    make_db_engine,
    make_sessionmaker,
    reclaim_free_pages,
)
from tests.service.conftest import make_settings


@pytest.mark.sqlite_only
def test_sqlite_pragmas(db: sessionmaker[Session]) -> None:
    with db() as session:
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert session.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert session.execute(text("PRAGMA busy_timeout")).scalar() == 5000


def test_foreign_keys_are_enforced(migrated_db: sessionmaker[Session]) -> None:
    with migrated_db() as session:
        session.add(ApiKey(tenant_id="tenant-missing", prefix="lpx_abcd", key_hash="0" * 64))
        with pytest.raises(IntegrityError):
            session.commit()


def test_timestamps_round_trip_as_aware_utc(migrated_db: sessionmaker[Session]) -> None:
    plus_two = timezone(timedelta(hours=2))
    moment = datetime(2030, 1, 2, 14, 30, 15, 123456, tzinfo=plus_two)
    with migrated_db() as session:
        session.add(Tenant(name="t", created_at=moment))
        session.commit()
    with migrated_db() as session:
        loaded = session.scalars(select(Tenant.created_at)).one()
        assert loaded == moment and loaded.tzinfo is not None
        assert loaded.utcoffset() == timedelta(0)
        assert loaded == datetime(2030, 1, 2, 12, 30, 15, 123456, tzinfo=UTC)
        # Comparisons in SQL work across zones too.
        earlier = datetime(2030, 1, 2, 13, 0, tzinfo=plus_two)  # 11:00 UTC
        assert session.scalars(select(Tenant.name).where(Tenant.created_at > earlier)).all() == [
            "t"
        ]


def test_naive_datetimes_are_rejected(migrated_db: sessionmaker[Session]) -> None:
    with migrated_db() as session:
        session.add(Tenant(name="t", created_at=datetime(2030, 1, 1)))
        with pytest.raises(StatementError, match="naive datetime"):
            session.commit()


def test_admin_vacuum_shrinks_an_old_sqlite_file_and_turns_on_incremental_vacuum(
    tmp_path: Path,
) -> None:
    # A database from before auto_vacuum was set: deletes leave its file at full size.
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE blobs (data BLOB)")
        conn.execute("INSERT INTO blobs VALUES (randomblob(4000000))")
        conn.commit()
        conn.execute("DELETE FROM blobs")
        conn.commit()
    grown = path.stat().st_size
    assert main(["admin", "vacuum", "--url", f"sqlite:///{path}"]) == 0
    assert path.stat().st_size < grown - 3_000_000
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # incremental from now on


def test_reclaim_after_a_delete_never_fails_the_delete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Another writer holds the lock past busy_timeout: the committed delete must stand.
    path = tmp_path / "locked.db"
    db_engine = make_db_engine(f"sqlite:///{path}", sqlite_busy_timeout_ms=10)
    with db_engine.begin() as conn:  # the file, in WAL mode, as the app creates it
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        with make_sessionmaker(db_engine)() as session:
            reclaim_free_pages(session)
    db_engine.dispose()
    assert "incremental_vacuum after a delete failed: database is locked" in caplog.text


@pytest.mark.postgres_only
def test_a_session_stalled_inside_a_transaction_is_ended_and_its_row_locks_freed(
    migrated_db: sessionmaker[Session], database_url: str
) -> None:
    """A process stalled inside a transaction (here: a session that locks a tenant's row and
    then does nothing) is ended by PostgreSQL after the setting's timeout, so a write to the
    row that waited for it goes through, and the stalled session's next statement fails."""
    with migrated_db() as session:
        tenant = Tenant(name="locked")
        session.add(tenant)
        session.commit()
        tenant_id = tenant.id
    stalled_engine = make_db_engine(database_url, postgres_idle_in_transaction_timeout_ms=500)
    try:
        with Session(stalled_engine) as stalled:
            assert stalled.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == (
                "500ms"
            )
            stalled.execute(select(Tenant).where(Tenant.id == tenant_id).with_for_update())
            with migrated_db() as writer:
                # Waits for the stalled session's row lock until PostgreSQL ends that session;
                # the lock_timeout fails the test instead of hanging it if it never does.
                writer.execute(text("SET LOCAL lock_timeout = '20s'"))
                writer.execute(
                    text("UPDATE tenants SET name = 'renamed' WHERE id = :id"), {"id": tenant_id}
                )
                writer.commit()
            with pytest.raises(DBAPIError, match="idle-in-transaction timeout"):
                stalled.execute(text("SELECT 1"))
        with migrated_db() as session:
            assert session.get(Tenant, tenant_id).name == "renamed"  # type: ignore[union-attr]
        # The pool replaces the ended connection: the engine works on.
        with stalled_engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        stalled_engine.dispose()


@pytest.mark.postgres_only
@pytest.mark.parametrize(("seconds", "shown"), [(None, "1min"), (2.5, "2500ms"), (0, "0")])
def test_the_engines_idle_transaction_timeout_is_the_settings(
    database_url: str, tmp_path: Path, seconds: float | None, shown: str
) -> None:
    overrides = {} if seconds is None else {"postgres_idle_in_transaction_timeout_s": seconds}
    db_engine = db_engine_for(make_settings(tmp_path, database_url=database_url, **overrides))
    try:
        with db_engine.connect() as conn:
            assert conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == shown
    finally:
        db_engine.dispose()
