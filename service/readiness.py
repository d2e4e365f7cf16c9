"""Readiness of the parts a process needs before it can serve (model, worker, batcher).

Lifespan hooks call ``expect(name)`` when they start something and ``ready(name)`` once it
works; ``/readyz`` answers 503 until every expected part is ready.
"""

from __future__ import annotations

import threading


class Readiness:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, str] = {}  # name -> why it is not ready
        self._known: set[str] = set()

    def expect(self, name: str, reason: str = "starting") -> None:
        with self._lock:
            self._known.add(name)
            self._pending[name] = reason

    def ready(self, name: str) -> None:
        with self._lock:
            self._known.add(name)
            self._pending.pop(name, None)

    def not_ready(self, name: str, reason: str) -> None:
        self.expect(name, reason)

    def snapshot(self) -> dict[str, str]:
        """``{name: "ok" | reason}`` for every part ever expected."""
        with self._lock:
            return {name: self._pending.get(name, "ok") for name in sorted(self._known)}
