"""LRU cache of merged LoRA weights (``W + scale · B @ A``) for ``mode="merged"`` rows.

A merged adapter costs a full copy of every targeted Linear weight (MiniLM q+v: 7 MiB fp32),
so the cache is bounded by bytes and evicts least-recently-used adapters. Entries are copies
(made by :func:`core.methods.lora.layer.merge_pairs`); the base weights are never written.
"""

from __future__ import annotations

from collections.abc import Hashable

from core.inference.lru import CountedLru
from core.methods.lora.layer import MergedLoraHooks
from core.tensors import tensor_bytes


class MergedCache(CountedLru[tuple[MergedLoraHooks, int]]):
    """Key → (merged hooks, their bytes), least recently used dropped first over ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.num_bytes = 0

    def get(self, key: Hashable) -> MergedLoraHooks | None:
        entry = self.lookup(key)
        return None if entry is None else entry[0]

    def put(self, key: Hashable, hooks: MergedLoraHooks) -> None:
        """Cache ``hooks`` unless they alone exceed the budget (then the caller just uses them)."""
        self.drop(key)
        n = tensor_bytes(hooks.merged.values())
        if n > self.max_bytes:
            return
        while self._entries and self.num_bytes + n > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self.num_bytes -= old
        self._entries[key] = (hooks, n)
        self.num_bytes += n

    def drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.num_bytes -= entry[1]
