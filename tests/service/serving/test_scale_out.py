"""Scale-out pieces that run in one process: NOTIFY trigger, invalidation listener, lease clock.

The multi-process checks (8 workers racing for 200 jobs, SIGKILL mid-job, two API replicas)
are in ``tests/e2e/test_scale_out.py``.
"""

from __future__ import annotations

import queue as stdlib_queue
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, delete, select, text, update
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from service.db.models import AdapterRow, Job, JobStatus, Tenant
from service.db.session import make_db_engine, make_sessionmaker
from service.db.types import utcnow
from service.jobs import queue
from service.main import create_app
from service.serving.invalidation import (
    CHANNEL,
    AdapterChange,
    InvalidationListener,
    listen_conninfo,
    parse_payload,
    resync_batcher,
)
from service.state import app_state
from service.worker.lease import LeaseKeeper
from tests.service.conftest import reset_postgres
from tests.service.helpers import (
    Headers,
    adapter_row,
    add_queued_job,
    add_tenant,
    store_adapter,
    wait_until,
)

Factory = sessionmaker[Session]
WAIT_S = 30.0  # generous: the box is shared and loaded


@pytest.fixture
def pg(postgres_url: str) -> Iterator[Factory]:
    """The session's PostgreSQL database, emptied, without an app."""
    reset_postgres(postgres_url)
    db_engine = make_db_engine(postgres_url)
    yield make_sessionmaker(db_engine)
    db_engine.dispose()


# --- payloads and URLs -----------------------------------------------------------------------


def test_parse_payload() -> None:
    assert parse_payload("tenant-1/sentiment.v2/7/insert") == AdapterChange(
        "tenant-1", "sentiment.v2", 7, "insert"
    )
    assert parse_payload("tenant-1/x/7") == AdapterChange("tenant-1", "x", 7, "delete")
    assert parse_payload("tenant-1/x/notanint/delete") == AdapterChange("tenant-1", "x", None)
    for bad in ("", "a/b", "a/b/c/d", "a/b/1/upsert", "/x/1", "t//1", "a/b/1/insert/x"):
        assert parse_payload(bad) is None, bad


def test_which_resident_copies_a_change_makes_stale() -> None:
    deleted = AdapterChange("t", "n", 3, "delete")
    inserted = AdapterChange("t", "n", 3, "insert")
    assert deleted.is_stale(("t", "n", 3))
    assert not deleted.is_stale(("t", "n", 4)) and not deleted.is_stale(("t", "n", 2))
    assert inserted.is_stale(("t", "n", 2)) and not inserted.is_stale(("t", "n", 3))
    assert not inserted.is_stale(("t", "n", 4))  # a later version, loaded already
    for other in (("u", "n", 2), ("t", "m", 2), "t/n/2", ("t", "n")):
        assert not deleted.is_stale(other) and not inserted.is_stale(other)
    assert AdapterChange("t", "n", None).is_stale(("t", "n", 9))


def test_listen_conninfo() -> None:
    assert listen_conninfo("sqlite:///x.db") is None
    assert (
        listen_conninfo("postgresql+psycopg://u:p%40ss@db:5433/lpx?sslmode=require")
        == "postgresql://u:p%40ss@db:5433/lpx?sslmode=require"
    )


# --- the trigger -----------------------------------------------------------------------------


def _drain(conn: psycopg.Connection[Any], expect: int = 1, timeout: float = WAIT_S) -> list[str]:
    """The next ``expect`` notifications (fewer if ``timeout`` passes first)."""
    return [n.payload for n in conn.notifies(timeout=timeout, stop_after=expect or None)]


@pytest.mark.postgres
def test_trigger_notifies_on_commit_only(pg: Factory, postgres_url: str) -> None:
    tenant_id = add_tenant(pg)
    with psycopg.connect(listen_conninfo(postgres_url), autocommit=True) as listener:  # type: ignore[arg-type]
        listener.execute(f"LISTEN {CHANNEL}")
        with pg() as session:  # rolled back: nothing is announced
            session.add(adapter_row(tenant_id, "ghost", version=3))
            session.flush()
            session.rollback()
        assert _drain(listener, expect=0, timeout=0.5) == []

        with pg() as session:
            session.add(adapter_row(tenant_id, "sentiment", version=4))
            session.commit()
        assert _drain(listener) == [f"{tenant_id}/sentiment/4/insert"]

        with pg() as session:  # an update announces the old row gone and the new one live
            session.execute(
                update(AdapterRow).where(AdapterRow.name == "sentiment").values(version=6)
            )
            session.commit()
        assert _drain(listener, 2) == [
            f"{tenant_id}/sentiment/4/delete",
            f"{tenant_id}/sentiment/6/insert",
        ]

        with pg() as session:
            session.execute(
                delete(AdapterRow).where(
                    AdapterRow.tenant_id == tenant_id, AdapterRow.name == "sentiment"
                )
            )
            session.commit()
        assert _drain(listener) == [f"{tenant_id}/sentiment/6/delete"]

        # A tenant's cascade delete announces its adapters too (no application code runs).
        with pg() as session:
            session.add(adapter_row(tenant_id, "a", version=5))
            session.commit()
        _drain(listener)
        with pg() as session:
            session.execute(delete(Tenant).where(Tenant.id == tenant_id))
            session.commit()
        assert _drain(listener) == [f"{tenant_id}/a/5/delete"]


# --- the listener thread ---------------------------------------------------------------------


@pytest.mark.postgres
def test_listener_delivers_changes_and_resyncs_after_reconnect(
    pg: Factory, postgres_url: str
) -> None:
    tenant_id = add_tenant(pg)
    changes: stdlib_queue.Queue[AdapterChange] = stdlib_queue.Queue()
    resyncs: list[float] = []
    listener = InvalidationListener(
        listen_conninfo(postgres_url),  # type: ignore[arg-type]
        changes.put,
        on_resync=lambda: resyncs.append(time.monotonic()),
        backoff_s=(0.2,),
        poll_s=0.2,
    ).start()
    try:
        assert listener.connected.wait(WAIT_S)
        with pg() as session:
            session.add(adapter_row(tenant_id, "m", version=1))
            session.commit()
        assert changes.get(timeout=WAIT_S) == AdapterChange(tenant_id, "m", 1, "insert")

        # The server drops the connection: the listener comes back and resyncs.
        admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'loraplex-invalidation' "
                    "AND datname = current_database()"
                )
            ).scalar_one()
        admin.dispose()
        assert killed == 1
        assert wait_until(lambda: listener.connects >= 2 and listener.connected.is_set(), WAIT_S)
        assert wait_until(lambda: len(resyncs) == 1, WAIT_S)

        with pg() as session:
            session.execute(delete(AdapterRow).where(AdapterRow.name == "m"))
            session.commit()
        assert changes.get(timeout=WAIT_S) == AdapterChange(tenant_id, "m", 1, "delete")
    finally:
        listener.stop()
    assert not listener.connected.is_set()


def test_listener_keeps_retrying_an_unreachable_server() -> None:
    listener = InvalidationListener(
        "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1",
        lambda change: None,
        backoff_s=(0.05,),
    ).start()
    try:
        time.sleep(0.5)
        assert not listener.connected.is_set()
        assert listener._thread.is_alive()  # still trying, never crashed
    finally:
        listener.stop()


class _FakeEngine:
    def __init__(self, keys: list[Any]) -> None:
        self.keys = keys
        self.unloaded: list[Any] = []

    def resident_keys(self) -> list[Any]:
        return list(self.keys)

    def unload(self, key: Any) -> bool:
        self.unloaded.append(key)
        return True


class _FakeBatcher:
    """The inference thread, as a thread that runs each command in order."""

    def __init__(self, keys: list[Any]) -> None:
        self.engine = _FakeEngine(keys)
        self.commands: stdlib_queue.Queue[Callable[[], None] | None] = stdlib_queue.Queue()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (command := self.commands.get()) is not None:
            command()
            self.commands.task_done()

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.commands.put(fn)

    def stop(self) -> None:
        """Run what is queued, then end the thread (it would idle until the suite ends)."""
        self.commands.put(None)
        self._thread.join()


def test_resync_drops_only_versions_gone_from_the_database(migrated_db: Factory) -> None:
    tenant_id = add_tenant(migrated_db)
    with migrated_db() as session:
        session.add(adapter_row(tenant_id, "kept", version=2))
        session.add(adapter_row(tenant_id, "replaced", version=5))
        session.commit()
    batcher = _FakeBatcher(
        [
            (tenant_id, "kept", 2),  # current
            (tenant_id, "replaced", 3),  # an older version of a live name
            (tenant_id, "deleted", 1),  # gone
            "not-a-tuple",
        ]
    )
    assert resync_batcher(batcher, migrated_db) == 2  # type: ignore[arg-type]
    batcher.stop()
    assert sorted(batcher.engine.unloaded) == [
        (tenant_id, "deleted", 1),
        (tenant_id, "replaced", 3),
    ]


@pytest.mark.postgres_only
def test_a_change_made_elsewhere_frees_the_resident_copy(
    tiny_serving_settings: Any, auth_headers_for: Any
) -> None:
    """The app's listener drops a resident adapter deleted by another process."""
    from service.serving.invalidation import invalidation
    from service.serving.lifespan import serving
    from tests.core.inference.helpers import lora

    tiny = tiny_serving_settings
    with TestClient(create_app(tiny, hooks=[serving, invalidation])) as client:
        auth = auth_headers_for(tiny)
        state = app_state(client.app)
        store_adapter(client, auth, "shared", lora(state.require_base_model(), r=4, seed=1))
        listener = state.invalidation_listener
        assert listener is not None and listener.connected.wait(WAIT_S)
        resp = client.post("/predict?adapter=shared", json={"inputs": ["good"]}, headers=auth)
        assert resp.status_code == 200, resp.text
        engine = state.require_batcher().engine
        assert engine.stats.resident_count == 1

        # "Another replica" deletes it: a plain SQL delete on its own connection.
        other = make_db_engine(tiny.db_url)
        with make_sessionmaker(other)() as session:
            session.execute(delete(AdapterRow).where(AdapterRow.name == "shared"))
            session.commit()
        other.dispose()
        assert wait_until(lambda: engine.stats.resident_count == 0, WAIT_S)
        assert listener.received >= 1
        resp = client.post("/predict?adapter=shared", json={"inputs": ["good"]}, headers=auth)
        assert resp.status_code == 404
        metrics = client.get("/metrics").text
        assert "loraplex_invalidation_listener_connected 1.0" in metrics


@pytest.fixture
def auth_headers_for() -> Callable[[Any], Headers]:
    def read(settings: Any) -> Headers:
        return {"Authorization": f"Bearer {settings.default_key_path.read_text().strip()}"}

    return read


# --- lease clock and self-fencing ------------------------------------------------------------


@pytest.mark.postgres
def test_leases_use_the_database_clock_on_postgres(
    pg: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers on other machines with skewed clocks must not expire each other's leases."""
    job_id = add_queued_job(pg, add_tenant(pg))
    with pg() as session:
        job = queue.claim_next_job(session, "w1", lease_seconds=30)
        assert job is not None
        db_now = session.scalar(select(text("now()")))
        session.commit()
    lease = job.lease_expires_at
    assert lease is not None and abs((lease - db_now).total_seconds() - 30) < 5

    # A reaper whose clock runs an hour fast does not take the job away.
    monkeypatch.setattr(queue, "utcnow", lambda: utcnow() + timedelta(hours=1))
    with pg() as session:
        assert queue.requeue_expired(session) == []
        assert queue.heartbeat(session, job_id, "w1", lease_seconds=30)
        job = session.get(Job, job_id)
        assert job is not None and job.status == JobStatus.RUNNING
        lease = job.lease_expires_at
    assert lease is not None and lease - utcnow() < timedelta(minutes=5)


class _Unreachable:
    """A session factory whose database is gone."""

    def __call__(self) -> Any:
        raise ConnectionError("database unreachable")


def test_lease_keeper_gives_up_after_a_lease_without_heartbeat() -> None:
    keeper = LeaseKeeper(
        _Unreachable(),  # type: ignore[arg-type]
        "job-1",
        "w1",
        lease_seconds=0.4,
        heartbeat_seconds=0.05,
    )
    with keeper:
        assert keeper.lost.wait(WAIT_S)
