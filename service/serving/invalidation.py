"""Cross-replica adapter invalidation: PostgreSQL ``LISTEN loraplex_adapters``.

Several ``loraplex serve`` replicas share one database, each with its own resident-adapter
cache. Correctness never depends on this module: every request resolves the adapter's current
``(tenant_id, name, version)`` from the database and weights are cached under that key, so
after a delete or replace commits, a later request on any replica gets the new version or a
404 (bound: 0 s, read-after-write on the primary). What this module bounds is *memory*: a
stale copy would otherwise sit in the LRU until evicted.

On PostgreSQL a trigger on ``adapters`` (migration 0002) runs ``pg_notify`` in the writing
transaction, for every insert, update and delete, whatever code path made it; the
notification (``<tenant_id>/<name>/<version>/<insert|delete>``) is delivered to every
listener when, and only if, that transaction commits. Each API process runs one
:class:`InvalidationListener` thread on a dedicated autocommit psycopg connection (session
mode: behind PgBouncer it needs a direct or session-pooled connection), and the inference
thread drops the stale resident copies (the deleted version; on an insert, every older
version of the name) about one round trip after the commit. The listener reconnects with
back-off; notifications sent while it was disconnected are lost, so after each reconnect it
compares every resident key with the database and drops those whose version is gone.

On SQLite (one box, one API process) there is nothing to listen to and nothing is needed:
the process that deletes an adapter invalidates its own batcher (``delete_adapter_row``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import select, tuple_
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import AdapterRow
from service.state import AppState

if TYPE_CHECKING:
    from service.serving.batcher import Batcher

logger = logging.getLogger(__name__)

CHANNEL = "loraplex_adapters"  # must match migrations/versions/0002_*.py
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
POLL_S = 1.0  # how often the thread looks up from waiting to check for stop
PING_S = 30.0  # a query on an idle connection, so a silently dead one is noticed
RESYNC_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class AdapterChange:
    tenant_id: str
    name: str
    version: int | None  # None: unknown, treat every resident version of the name as stale
    op: str = "delete"  # "delete": this version is gone; "insert": it is the live one now

    def is_stale(self, key: object) -> bool:
        """Whether a resident cache key ``(tenant_id, name, version)`` is stale after this."""
        if not isinstance(key, tuple) or len(key) != 3:
            return False
        if key[:2] != (self.tenant_id, self.name):
            return False
        if self.version is None:
            return True
        if self.op == "insert":
            return bool(key[2] < self.version)  # versions only grow: older ones are stale
        return bool(key[2] == self.version)


def parse_payload(payload: str) -> AdapterChange | None:
    """``<tenant_id>/<name>/<version>/<op>`` (what the trigger sends); None if malformed."""
    parts = payload.split("/")
    if len(parts) not in (3, 4) or not parts[0] or not parts[1]:
        return None
    op = parts[3] if len(parts) == 4 else "delete"
    if op not in ("insert", "delete"):
        return None
    try:
        version: int | None = int(parts[2])
    except ValueError:
        version = None
    return AdapterChange(parts[0], parts[1], version, op)


def listen_conninfo(database_url: str) -> str | None:
    """A libpq connection string for ``database_url``, or None if it is not PostgreSQL."""
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return None
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class InvalidationListener:
    """A daemon thread: LISTEN on :data:`CHANNEL`, call ``on_change`` for each notification.

    ``on_resync`` runs after every reconnect (not the first connect): notifications may have
    been missed while the connection was down.
    """

    def __init__(
        self,
        conninfo: str,
        on_change: Callable[[AdapterChange], None],
        *,
        on_resync: Callable[[], object] | None = None,
        channel: str = CHANNEL,
        backoff_s: Iterable[float] = BACKOFF_S,
        poll_s: float = POLL_S,
        ping_s: float = PING_S,
    ) -> None:
        self.conninfo = conninfo
        self.on_change = on_change
        self.on_resync = on_resync
        self.channel = channel
        self.backoff_s = tuple(backoff_s)
        self.poll_s = poll_s
        self.ping_s = ping_s
        self.connected = threading.Event()
        self.received = 0
        self.connects = 0
        self._stop = threading.Event()
        self._conn: Any = None
        self._thread = threading.Thread(target=self._run, name="adapter-invalidation", daemon=True)

    def start(self) -> InvalidationListener:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    # --- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                for _ in self._session():
                    failures = 0  # a working connection resets the back-off
            except Exception as exc:
                if self._stop.is_set():
                    break
                delay = self.backoff_s[min(failures, len(self.backoff_s) - 1)]
                failures += 1
                level = logging.WARNING if failures <= 3 else logging.ERROR
                logger.log(
                    level,
                    "adapter invalidation listener: %s; reconnecting in %.1f s",
                    exc,
                    delay,
                )
                self._stop.wait(delay)
            finally:
                self.connected.clear()
                self._close()

    def _session(self) -> Iterator[None]:
        """One connection's life; yields after each wait so the caller can reset back-off."""
        import psycopg

        self._conn = psycopg.connect(
            self.conninfo,
            autocommit=True,
            connect_timeout=10,
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
            application_name="loraplex-invalidation",
        )
        self._conn.execute(f"LISTEN {self.channel}")
        self.connects += 1
        self.connected.set()
        logger.info("listening for adapter changes on %s", self.channel)
        if self.connects > 1 and self.on_resync is not None:
            try:
                self.on_resync()
            except Exception:  # stale copies then age out of the LRU; keep listening
                logger.exception("resync after reconnect failed")
        last_ping = time.monotonic()
        while not self._stop.is_set():
            for notify in self._conn.notifies(timeout=self.poll_s):
                self._handle(notify.payload)
            if time.monotonic() - last_ping >= self.ping_s:
                self._conn.execute("SELECT 1")
                last_ping = time.monotonic()
            yield

    def _handle(self, payload: str) -> None:
        self.received += 1
        change = parse_payload(payload)
        if change is None:
            logger.warning("ignoring malformed adapter notification %r", payload)
            return
        try:
            self.on_change(change)
        except Exception:
            logger.exception("adapter invalidation for %r failed", payload)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                logger.debug("closing the listener connection failed", exc_info=True)


# --- wiring to the serving batcher -----------------------------------------------------------


def drop_stale(batcher: Batcher, change: AdapterChange) -> None:
    """Unload the resident copies ``change`` makes stale, on the inference thread."""

    def drop() -> None:
        for key in batcher.engine.resident_keys():
            if change.is_stale(key):
                batcher.engine.unload(key)

    batcher.call_soon(drop)


def stale_keys(session: Session, keys: list[Any]) -> list[Any]:
    """Which ``(tenant_id, name, version)`` keys no longer match a row in the database."""
    triples = [k for k in keys if isinstance(k, tuple) and len(k) == 3]
    live: set[tuple[str, str, int]] = set()
    for i in range(0, len(triples), 500):
        chunk = triples[i : i + 500]
        rows = session.execute(
            select(AdapterRow.tenant_id, AdapterRow.name, AdapterRow.version).where(
                tuple_(AdapterRow.tenant_id, AdapterRow.name).in_([k[:2] for k in chunk])
            )
        ).all()
        live.update((r.tenant_id, r.name, r.version) for r in rows)
    return [k for k in triples if k not in live]


def resync_batcher(batcher: Batcher, factory: sessionmaker[Session]) -> int:
    """Drop every resident adapter whose version is no longer in the database; how many."""
    snapshot: Future[list[Any]] = Future()

    def take() -> None:  # on the inference thread, the engine's only owner
        snapshot.set_result(list(batcher.engine.resident_keys()))

    batcher.call_soon(take)
    keys = snapshot.result(timeout=RESYNC_TIMEOUT_S)
    with factory() as session:
        stale = stale_keys(session, keys)

    def drop() -> None:
        for key in stale:
            batcher.engine.unload(key)

    if stale:
        batcher.call_soon(drop)
        logger.info("resync after reconnect: dropped %d stale adapters", len(stale))
    return len(stale)


class ListenerCollector(Collector):
    """Prometheus: is the listener connected, how many notifications it handled."""

    def __init__(self, listener: InvalidationListener) -> None:
        self.listener = listener

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "loraplex_invalidation_listener_connected",
            "1 while the adapter invalidation listener holds its LISTEN connection.",
            value=1.0 if self.listener.connected.is_set() else 0.0,
        )
        yield CounterMetricFamily(
            "loraplex_invalidation_notifications",
            "Adapter change notifications received.",
            value=self.listener.received,
        )


@asynccontextmanager
async def invalidation(state: AppState) -> AsyncIterator[None]:
    """Lifespan hook (after ``serving``): listen for adapter changes from other processes."""
    settings = state.settings
    conninfo = listen_conninfo(settings.listen_database_url or settings.db_url)
    # The encoder's batcher and each decoder's scoring batcher hold resident adapters.
    scorers = (state.decoder_scoring or {}).values()
    batchers = [b for b in [state.batcher, *(s.batcher for s in scorers)] if b is not None]
    if conninfo is None or not batchers:
        # SQLite: one API process, which invalidates its own batchers on delete.
        yield
        return
    factory = state.sessionmaker

    def on_change(change: AdapterChange) -> None:
        for batcher in batchers:
            drop_stale(batcher, change)

    def on_resync() -> int:
        return sum(resync_batcher(batcher, factory) for batcher in batchers)

    listener = InvalidationListener(conninfo, on_change, on_resync=on_resync)
    state.invalidation_listener = listener
    state.metrics.add_collector(ListenerCollector(listener))
    listener.start()
    try:
        yield
    finally:
        listener.stop()
