"""PostgreSQL out of reach is a 503 ``database_unavailable`` with Retry-After, not a 500.

An outage (the server restarting, failing over, a network cut) is transient: the request was
rolled back, so a client may send it again as it was. Each answer logs one warning line, not
a traceback: an outage would otherwise log one per request. The outage here is real:
PostgreSQL ends the app's sessions and refuses new ones, then lets them in again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from service.api.deps import SessionDep
from service.config import Settings
from service.db.models import Tenant
from service.main import create_app
from service.state import app_state
from tests.service.helpers import (
    CLASSIFICATION_ROWS,
    POSTGRES_ADMIN_URL,
    Headers,
    assert_error,
    default_auth,
    jsonl,
    upload,
)

pytestmark = pytest.mark.postgres_only

ERRORS_LOGGER = "service.api.errors"


@contextmanager
def refusing_connections(url: str) -> Iterator[None]:
    """The database at ``url`` ends its sessions and refuses new ones until the block ends:
    to the app, PostgreSQL is gone (psycopg: "connection failed: ... not currently accepting
    connections")."""
    name = make_url(url).database
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
        yield
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()


def _outage_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    records = [r for r in caplog.records if r.name == ERRORS_LOGGER]
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in records), records
    return records


def test_requests_while_postgres_is_unreachable_are_503_and_the_same_request_works_after(
    client: TestClient, auth: Headers, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with refusing_connections(database_url), caplog.at_level(logging.WARNING, ERRORS_LOGGER):
        answers = [
            client.get("/v1/datasets", headers=auth),
            upload(client, auth, jsonl(CLASSIFICATION_ROWS), name="sent-twice"),
        ]
        ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["database"] == "unreachable"
    for resp in answers:
        assert_error(resp, 503, code="database_unavailable", type="service_unavailable_error")
        assert resp.headers["retry-after"] == "5"
    warnings = _outage_warnings(caplog)
    assert len(warnings) == len(answers)
    assert all(r.getMessage().startswith("database_unavailable on ") for r in warnings)

    # PostgreSQL is back: the pool replaces its dead connections, and the refused upload,
    # sent again as it was, is stored once.
    resp = upload(client, auth, jsonl(CLASSIFICATION_ROWS), name="sent-twice")
    assert resp.status_code == 200, resp.text
    listed = client.get("/v1/datasets", headers=auth).json()["data"]
    assert [d["name"] for d in listed] == ["sent-twice"]


def test_a_connection_ended_mid_transaction_is_a_503_and_its_writes_are_gone(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The session's connection ended by the server between two statements (SQLAlchemy then
    invalidates it): the route's first write is rolled back with it."""
    app = create_app(settings, hooks=[])

    @app.post("/write-then-lose-connection")
    def write_then_lose_connection(session: SessionDep) -> None:
        session.add(Tenant(name="half-written"))
        session.flush()
        session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        session.commit()

    with TestClient(app) as client, caplog.at_level(logging.WARNING, ERRORS_LOGGER):
        resp = client.post("/write-then-lose-connection")
        assert_error(resp, 503, code="database_unavailable", type="service_unavailable_error")
        assert resp.headers["retry-after"] == "5"
        assert len(_outage_warnings(caplog)) == 1
        # The next request gets a live connection, and the tenant was never stored.
        assert client.get("/v1/datasets", headers=default_auth(settings)).status_code == 200
        session: Session
        with app_state(app).sessionmaker() as session:
            assert session.scalar(select(Tenant).where(Tenant.name == "half-written")) is None


def test_a_refused_statement_is_still_a_500(settings: Settings) -> None:
    """Only a lost connection is an outage: a statement PostgreSQL refuses is a fault."""
    app = create_app(settings, hooks=[])

    @app.get("/bad-sql")
    def bad_sql(session: SessionDep) -> None:
        session.execute(text("SELECT no_such_column FROM tenants"))

    with TestClient(app, raise_server_exceptions=False) as client:
        assert_error(client.get("/bad-sql"), 500, code="internal_error")


def test_a_connection_lost_after_a_read_route_returns_leaves_its_answer_whole(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The route's read transaction is rolled back when its session closes, after the answer
    has started: a connection ended by then made that rollback raise where no handler can
    answer (the client's connection dropped, and two tracebacks were logged)."""
    app = create_app(settings, hooks=[])

    @app.get("/read-then-lose-connection")
    def read_then_lose_connection(session: SessionDep) -> dict[str, int]:
        tenants = len(session.scalars(select(Tenant)).all())
        pid = session.scalar(text("SELECT pg_backend_pid()"))
        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        admin.dispose()
        return {"tenants": tenants}

    with TestClient(app) as client, caplog.at_level(logging.WARNING, "service.api.deps"):
        resp = client.get("/read-then-lose-connection")
        assert resp.status_code == 200 and resp.json() == {"tenants": 1}
        (warning,) = [r for r in caplog.records if r.name == "service.api.deps"]
        assert warning.getMessage().startswith("closing a request's database session failed")
        assert client.get("/v1/datasets", headers=default_auth(settings)).status_code == 200
