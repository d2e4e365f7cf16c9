"""An ordered map kept least recently used first, counting its lookups as hits and misses.

The residency ledger and the merged-weight cache are both such maps with their own eviction
rules (bytes, pins); this is the part they share.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class CountedLru(Generic[V]):
    def __init__(self) -> None:
        self._entries: OrderedDict[Hashable, V] = OrderedDict()  # least recently used first
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: Hashable) -> V | None:
        """The entry for ``key``, now the most recently used (a hit), or None (a miss)."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry
