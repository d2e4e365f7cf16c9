"""The inference request path's lookup (API key + adapter), remembered when that is exact.

Every ``/predict`` and ``/reward/compare`` resolves the caller's key and the adapter's current
version (:func:`~service.serving.queries.find_key_and_adapter`). Under load that thread hop
and query cost more server CPU than the rest of the request path, so a process that sees every
write that could change the answer remembers good answers: with SQLite there is one API process
(docs/scaling.md), and the only writes that can turn a good answer bad, deleting an adapter and
revoking a key, go through its own routes, which drop the entries before they respond. With
PostgreSQL other replicas write too, so the cache is off there and every request asks the
database (a delete on one replica is a 404 on every replica at once).

Only complete successes are kept (a live key of an existing tenant, an existing adapter): an
unknown key or adapter is asked again every time, so a key or adapter created elsewhere (the
CLI, a worker finishing a job) is seen at once. Entries also expire after ``ttl`` seconds, so a
row edited by hand is picked up eventually. A lookup that raced a drop is not stored: drops
bump a generation, and ``put`` refuses answers read under an older one.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from service.serving.queries import AdapterRef

DEFAULT_TTL_S = 60.0
DEFAULT_MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class _Entry:
    ref: AdapterRef
    key_id: str
    expires: float


class LookupCache:
    """``(key hash, adapter name) → AdapterRef`` for callers already known to be valid."""

    def __init__(self, ttl: float = DEFAULT_TTL_S, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._generation = 0
        self.hits = 0
        self.misses = 0

    @property
    def generation(self) -> int:
        """Read before a database lookup; hand it to :meth:`put` with the answer."""
        return self._generation

    def get(self, key_hash: str, name: str) -> AdapterRef | None:
        with self._lock:
            entry = self._entries.get((key_hash, name))
            if entry is None or entry.expires < time.monotonic():
                self.misses += 1
                return None
            self._entries.move_to_end((key_hash, name))
            self.hits += 1
            return entry.ref

    def put(self, key_hash: str, name: str, ref: AdapterRef, key_id: str, generation: int) -> None:
        with self._lock:
            if generation != self._generation:  # a drop happened since it was read
                return
            self._entries[(key_hash, name)] = _Entry(ref, key_id, time.monotonic() + self.ttl)
            self._entries.move_to_end((key_hash, name))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def drop_adapter(self, tenant_id: str, name: str) -> None:
        """Before a delete of this adapter is answered."""
        self._drop(lambda e: e.ref.key[:2] == (tenant_id, name))

    def drop_key(self, key_id: str) -> None:
        """Before a revocation of this key is answered."""
        self._drop(lambda e: e.key_id == key_id)

    def _drop(self, stale: Callable[[_Entry], bool]) -> None:
        with self._lock:
            self._generation += 1
            for cache_key in [k for k, e in self._entries.items() if stale(e)]:
                del self._entries[cache_key]
