"""The LoRA adapters running sequences use, stacked in one bank, pinned while in use.

Each sequence's LoRA delta comes from :class:`core.inference.bank.LoraBank` by its adapter's
slot (the BGMV gather + bmm of :class:`core.inference.bank.MixedLoraHooks`), so sequences of
different adapters, ranks and target sets, and sequences of the bare base, share one decode
step. An adapter is pinned by every running sequence that uses it and never evicted while
pinned; unpinned adapters stay resident (least recently used evicted first) until the bank
holds ``max_adapters``. Owned by the scheduler's thread, like the bank.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from torch import Tensor

from core.decoder.forward import NO_HOOKS, DecoderWeights, LinearHooks
from core.inference.bank import LoraBank, MixedLoraHooks, Site


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's LoRA pairs, as the scheduler receives them with a request.

    ``key`` identifies these exact weights (a new version of an adapter needs a new key).
    """

    key: Hashable
    pairs: dict[Site, tuple[Tensor, Tensor]]  # (layer, target) -> (A [r, in], B [out, r])
    scaling: float


@dataclass
class _Entry:
    slot: int
    pins: int = 0
    retired: bool = False  # invalidated while pinned: freed when the last pin goes


class AdapterFull(RuntimeError):  # noqa: N818 - a state to wait out, not a bug
    """Every bank slot is pinned by running sequences: the request waits for one to finish."""


class AdapterSlots:
    """Bank slots by adapter key, with pins and least-recently-used eviction."""

    def __init__(self, weights: DecoderWeights, max_adapters: int) -> None:
        if max_adapters < 1:
            raise ValueError("max_adapters must be at least 1")
        # The bank reads only ``linear_shape`` and ``num_hidden_layers`` from its config, which
        # a DecoderConfig has under the same names.
        self.bank = LoraBank(
            weights.config,  # type: ignore[arg-type]
            device=weights.device,
            dtype=weights.dtype,
            initial_capacity=min(max_adapters, 8),
        )
        self.max_adapters = max_adapters
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # least recent first
        self._retired: dict[int, _Entry] = {}  # by slot

    def __len__(self) -> int:
        return len(self._entries)

    def resident_keys(self) -> list[Hashable]:
        """The resident adapters' keys (invalidated ones still pinned not included)."""
        return list(self._entries)

    def pins(self, key: Hashable) -> int:
        entry = self._entries.get(key)
        return entry.pins if entry is not None else 0

    def acquire(self, adapter: LoraWeights) -> int:
        """The adapter's bank slot, loading it if needed, pinned once more."""
        entry = self._entries.get(adapter.key)
        if entry is None:
            while len(self._entries) + len(self._retired) >= self.max_adapters:
                victim = next((k for k, e in self._entries.items() if e.pins == 0), None)
                if victim is None:
                    raise AdapterFull(f"all {self.max_adapters} adapter slots are in use")
                self.bank.remove(self._entries.pop(victim).slot)
            dev, dtype = self.bank.device, self.bank.dtype
            pairs = {
                site: (a.to(dev, dtype), b.to(dev, dtype)) for site, (a, b) in adapter.pairs.items()
            }
            entry = _Entry(self.bank.add(pairs, adapter.scaling))
            self._entries[adapter.key] = entry
        self._entries.move_to_end(adapter.key)
        entry.pins += 1
        return entry.slot

    def release(self, slot: int, key: Hashable) -> None:
        """One pin fewer on the adapter ``key`` loaded at ``slot``."""
        entry = self._retired.get(slot)
        if entry is None:
            entry = self._entries[key]
        entry.pins -= 1
        if entry.retired and entry.pins == 0:
            del self._retired[slot]
            self.bank.remove(slot)

    def invalidate(self, key: Hashable) -> None:
        """Forget ``key`` (its adapter was deleted or replaced): new requests load it anew;
        sequences still running with it finish with the weights they started with."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if entry.pins == 0:
            self.bank.remove(entry.slot)
        else:
            entry.retired = True
            self._retired[entry.slot] = entry

    def hooks(self, slots: Tensor) -> LinearHooks:
        """Hooks adding each row's LoRA delta (``slots[i]`` = -1: the bare base)."""
        if bool((slots < 0).all()):
            return NO_HOOKS
        return MixedLoraHooks(self.bank, slots)
