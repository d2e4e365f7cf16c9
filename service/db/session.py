"""Engine and session factory built from a database URL."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.errors import ServiceError

if TYPE_CHECKING:
    from service.config import Settings

logger = logging.getLogger(__name__)


def sqlite_file(url: URL) -> Path | None:
    """The file behind a SQLite URL, or None for in-memory databases."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def ensure_sqlite_file(url: str | URL) -> None:
    """Create a SQLite file's folder, so a fresh ``data_dir`` just works, and the file itself,
    readable by its owner only: it holds every tenant's datasets and adapter weights, and
    SQLite would create it under the umask (0644 by default: readable by every local user).
    Its -wal and -shm files take the database file's mode. An existing file is left as it is.
    """
    path = sqlite_file(make_url(url))
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def normalize_url(url: str | URL) -> URL:
    """Accept plain ``postgresql://`` URLs: psycopg 3 is the driver we ship, not psycopg2."""
    url = make_url(url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


SQLITE_POOL_SIZE = 20


def make_db_engine(
    url: str | URL,
    *,
    sqlite_busy_timeout_ms: int = 5000,
    postgres_idle_in_transaction_timeout_ms: int = 0,
    **kwargs: Any,
) -> Engine:
    url = normalize_url(url)
    if url.get_backend_name() == "sqlite":
        ensure_sqlite_file(url)
        # Sessions cross threads (FastAPI runs sync dependencies and routes in a pool).
        connect_args = kwargs.setdefault("connect_args", {})
        connect_args.setdefault("check_same_thread", False)
        # No prepared-statement cache: pysqlite never clears a cached statement's bindings,
        # so each pooled connection kept a private copy of the last blob it wrote (a whole
        # checkpoint, adapter or dataset: +150 MiB RSS per connection after a `full` job's
        # checkpoint, measured). Re-preparing a statement costs microseconds.
        connect_args.setdefault("cached_statements", 0)
        path = sqlite_file(url)
        if path is not None and "poolclass" not in kwargs:
            # Keep a connection per busy request thread: beyond the pool, QueuePool closes
            # connections on return, and reopening one (+ its PRAGMAs) on every inference
            # request under load cost more than the request's query.
            kwargs.setdefault("pool_size", SQLITE_POOL_SIZE)
        db_engine = create_engine(url, **kwargs)
        _configure_sqlite(db_engine, busy_timeout_ms=sqlite_busy_timeout_ms, wal=path is not None)
        return db_engine
    kwargs.setdefault("pool_pre_ping", True)
    db_engine = create_engine(url, **kwargs)
    if postgres_idle_in_transaction_timeout_ms > 0:
        _end_idle_transactions(db_engine, postgres_idle_in_transaction_timeout_ms)
    return db_engine


def db_engine_for(settings: Settings, **kwargs: Any) -> Engine:
    """The engine of ``settings.db_url`` with the settings' lock and transaction timeouts."""
    return make_db_engine(
        settings.db_url,
        sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms,
        postgres_idle_in_transaction_timeout_ms=round(
            settings.postgres_idle_in_transaction_timeout_s * 1000
        ),
        **kwargs,
    )


def _end_idle_transactions(db_engine: Engine, timeout_ms: int) -> None:
    """Have PostgreSQL end any of this engine's sessions that sits in an open transaction,
    doing nothing, for ``timeout_ms``: a process stalled there (stopped, swapped out, a VM
    paused) would otherwise hold its row locks, a job's included, for as long as it stalls,
    and every write to those rows, the reaper's and the worker taking over the job included,
    would wait for it. The session's next statement fails, so the stalled process finds out
    when it resumes; every transaction here is short (milliseconds), and the routes that wait
    on a client hold none."""

    @event.listens_for(db_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # A plain SET, not the startup packet's `options`, which PgBouncer refuses. In
        # autocommit, so that it is not rolled back with the pool's first reset.
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute(f"SET idle_in_transaction_session_timeout = {int(timeout_ms)}")
        finally:
            dbapi_connection.autocommit = autocommit


def _configure_sqlite(db_engine: Engine, *, busy_timeout_ms: int, wal: bool) -> None:
    @event.listens_for(db_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            # Deletes give their pages back (at `reclaim_free_pages`). Takes effect on a new
            # database or at the next VACUUM (`loraplex admin vacuum`), a no-op otherwise;
            # set before journal_mode, whose switch to WAL fixes a new file's mode.
            cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
            if wal:
                # WAL: readers never block the writer, the API stays responsive while a
                # worker writes checkpoints.
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            # Wait for the write lock instead of failing at once with "database is locked".
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()


def reclaim_free_pages(session: Session) -> None:
    """On SQLite, shrink the file by the pages a delete just freed (after the commit).

    A database whose ``auto_vacuum`` is not INCREMENTAL (created before it was set, until
    ``loraplex admin vacuum``) keeps its free pages for reuse; PostgreSQL's autovacuum does
    this job there.
    """
    bind = session.get_bind()
    if bind.dialect.name != "sqlite":
        return
    with bind.engine.connect() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        try:
            # executescript steps the pragma to the end; pysqlite's execute steps it once,
            # which frees a single page.
            driver.executescript("PRAGMA incremental_vacuum")
        except sqlite3.OperationalError as exc:
            # The delete is committed: a write lock held past busy_timeout must not turn it
            # into an error. The pages stay free for reuse and go at the next reclaim.
            logger.warning("incremental_vacuum after a delete failed: %s", exc)


def vacuum(db_engine: Engine) -> None:
    """Rewrite the database without its free space: ``loraplex admin vacuum``.

    On SQLite this also turns a database created before ``auto_vacuum`` was set into one
    whose deletes give space back (the connect hook's pragma applies at the VACUUM). On
    PostgreSQL it is a plain VACUUM (no table locks), which autovacuum also runs by itself.
    """
    # VACUUM cannot run inside a transaction, on either database.
    with db_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM")
        if db_engine.dialect.name == "sqlite":
            # Under WAL the rewritten pages sit in the -wal file until a checkpoint.
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def make_sessionmaker(db_engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: routes serialise objects after committing them.
    return sessionmaker(bind=db_engine, expire_on_commit=False, autoflush=True)


@contextmanager
def committed_or_conflict(session: Session, conflict: ServiceError) -> Iterator[None]:
    """Run the block and commit it, or roll all of it back.

    A uniqueness violation at the commit (another request took the same name between our
    check and our insert) is answered with ``conflict``; any other failure propagates.
    """
    try:
        yield
        session.commit()
    except IntegrityError:
        session.rollback()
        raise conflict from None
    except BaseException:
        session.rollback()
        raise
