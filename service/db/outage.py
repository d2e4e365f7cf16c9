"""Database errors that are the database's state for now, not a fault of the statement.

The API answers them with a 503 and ``Retry-After`` (``service.api.errors``); a worker keeps
training through them (``service.worker.job_run``).
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError


def database_busy(exc: BaseException) -> bool:
    """Load on the database rather than a fault: every pooled connection in use past the
    pool's timeout, or SQLite's write lock held by another process past ``busy_timeout``."""
    if isinstance(exc, PoolTimeoutError):
        return True
    return isinstance(exc, OperationalError) and "database is locked" in str(exc.orig)


# SQLSTATEs of a session PostgreSQL ended or would not open: class 08 (connection exception),
# and the server shut down, crashed or still starting (pg_terminate_backend ends one as 57P01).
_CONNECTION_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def database_unreachable(exc: BaseException) -> bool:
    """PostgreSQL out of reach: a connection it ended or that broke mid-request (SQLAlchemy
    then invalidates it), or none to be had (refused, reset, the server going down). Not a
    refused statement (syntax, constraint, a timeout): those stay faults."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    # psycopg's errors carry a SQLSTATE, None where libpq itself failed (no connection could
    # be opened, or the one in use broke); SQLite's have none ("").
    sqlstate = getattr(exc.orig, "sqlstate", "")
    return sqlstate is None or str(sqlstate).startswith(_CONNECTION_SQLSTATES)


def database_transient(exc: BaseException) -> bool:
    """Busy or out of reach: worth retrying shortly."""
    return database_busy(exc) or database_unreachable(exc)
