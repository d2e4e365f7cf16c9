"""Which adapters are resident on the serving device: an LRU ledger charged by bytes.

The ledger decides what is resident; :mod:`core.inference.engine` decides what a batch runs
with. A resident LoRA adapter is a slot in the stacked :class:`~core.inference.bank.LoraBank`
plus its head's weights; an adapter of any other method is a model built on the serving base.
Each entry is charged the bytes it takes on the device, and least recently used entries are
evicted to keep ``max_bytes``.

Pins. An entry that an unreleased :class:`~core.inference.execute.Plan` uses is *pinned*: it is
never chosen for eviction, and when it is unloaded, evicted or replaced while pinned it leaves
the ledger at once (no later plan sees it) but stays *retired*, still charged and still holding
its bank slot, until the last pin goes, because a forward on another thread may be reading that
slot. Freeing it earlier would let the next load overwrite weights mid-forward.

Refusals. A load whose adapter alone exceeds the budget raises :class:`AdapterTooLargeError`,
which no retry can cure; one that fits the budget but finds the room held by entries in use
(pinned, or kept for the batch being planned) raises :class:`ResidencyBusyError`: with no plan
unreleased and nothing kept it would load, so its rows can run later (the service's batcher
runs them again).

Like the engine it belongs to, the ledger has one owner thread (docs/architecture.md
invariant 3) and takes no locks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from core.adapter import Adapter
from core.base import FrozenBase
from core.errors import CoreError
from core.heads import HeadConfig
from core.inference.bank import LoraBank, Site
from core.inference.lru import CountedLru
from core.inference.merged_cache import MergedCache
from core.model import AdaptedModel
from core.tensors import tensor_bytes


class ResidencyError(CoreError):
    """An adapter cannot be made resident within ``max_resident_bytes``."""


class AdapterTooLargeError(ResidencyError):
    """The adapter alone needs more than ``max_resident_bytes``: it can never be resident."""

    def __init__(self, nbytes: int, budget: int) -> None:
        super().__init__(f"adapter needs {nbytes} bytes; the budget is {budget}")
        self.nbytes = nbytes
        self.budget = budget


class ResidencyBusyError(ResidencyError):
    """The adapter fits the budget, but adapters in use (pinned by unreleased plans, or kept
    for the batch being planned) hold the room it needs: it fits once they are released."""


def choose_victims(
    evictable: Iterable[tuple[Hashable, int]], held: int, nbytes: int, budget: int
) -> list[Hashable]:
    """The entries to evict so that ``nbytes`` more fit ``budget`` beside the ``held`` bytes.

    ``evictable`` lists the ``(key, bytes)`` of entries that may go, least recently used first.
    The victims are chosen before any is evicted, so a load that cannot fit evicts nothing.
    Raises :class:`AdapterTooLargeError` when ``nbytes`` alone exceeds the budget and
    :class:`ResidencyBusyError` when evicting every candidate would still not make room.
    """
    if nbytes > budget:
        raise AdapterTooLargeError(nbytes, budget)
    victims: list[Hashable] = []
    for key, size in evictable:
        if held + nbytes <= budget:
            break
        victims.append(key)
        held -= size
    if held + nbytes > budget:
        raise ResidencyBusyError(
            f"adapter needs {nbytes} bytes; only {budget - held} can be freed "
            "without evicting adapters that this batch or batches in flight use"
        )
    return victims


@dataclass
class Resident:
    """One resident adapter: what its rows' forward and head need, and its ledger state."""

    head: HeadConfig
    nbytes: int  # charged to the budget: LoRA pairs at the bank's dtype + head, or the model
    reserved: int  # positions before the real tokens (prompt tuning)
    # LoRA: a bank slot + the head's weights (fp32: heads always run in fp32).
    slot: int | None = None
    scaling: float = 0.0
    head_weight: Tensor | None = None  # [num_labels, hidden] (reward: [1, hidden])
    head_bias: Tensor | None = None  # [num_labels]
    # Other methods: the built model (method + head on the serving base).
    model: AdaptedModel | None = None
    # Plans not yet released that use this entry; while > 0 its slot is never freed or reused.
    pins: int = 0
    # Unloaded, evicted or replaced while pinned: released when the last pin goes.
    retired: bool = False


class Residency(CountedLru[Resident]):
    """Resident adapters by key, least recently used first, within ``max_bytes``."""

    def __init__(
        self,
        base: FrozenBase,
        serving: FrozenBase,
        bank: LoraBank,
        merged: MergedCache,
        *,
        dtype: torch.dtype,
        max_bytes: int,
        on_evict: Callable[[Hashable], None] | None = None,
    ) -> None:
        super().__init__()
        self.base = base  # the caller's base: adapters are checked against its fingerprint
        self.serving = serving  # the base as served (device, dtype): adapters are built on it
        self.bank = bank
        self.merged = merged  # merged copies of an adapter die with its residency
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.on_evict = on_evict
        self.bytes = 0  # resident + retired-but-pinned entries
        self.loads = self.evictions = 0

    def __getitem__(self, key: Hashable) -> Resident:
        return self._entries[key]

    def keys(self) -> list[Hashable]:
        """Resident keys, least recently used first."""
        return list(self._entries)

    # load/unload/unpin run in inference mode: the bank's storage is created (or grown) inside
    # a plan, so it holds inference tensors, which torch refuses to write to outside the mode.
    @torch.inference_mode()
    def load(
        self, key: Hashable, adapter: Adapter, keep: Collection[Hashable] = ()
    ) -> list[Hashable]:
        """Make ``adapter`` resident under ``key`` (replacing a previous one); return evictions.

        The adapter is validated and fully built before anything is published, so a failed
        load leaves the ledger as it was.
        """
        adapter.check_base(self.base)
        entry, pairs = self._prepare(adapter)
        evicted = self._make_room(key, entry.nbytes, keep)
        if pairs is not None:
            entry.slot = self.bank.add(pairs, entry.scaling)
        old = self._entries.pop(key, None)
        self._entries[key] = entry  # published: visible to the next plan
        self.bytes += entry.nbytes
        if old is not None:
            self._retire(key, old)
        self.loads += 1
        return evicted

    @torch.inference_mode()
    def unload(self, key: Hashable) -> bool:
        """Take ``key`` out of service now (freed once unpinned). False if it was not resident."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._retire(key, entry)
        return True

    def pin(self, entries: Iterable[Resident | None]) -> list[Resident]:
        """Pin each distinct entry once; the list returned is what :meth:`unpin` takes back."""
        pinned = list({id(e): e for e in entries if e is not None}.values())
        for entry in pinned:
            entry.pins += 1
        return pinned

    @torch.inference_mode()  # frees bank slots: inference tensors, written only in the mode
    def unpin(self, pinned: list[Resident]) -> None:
        for entry in pinned:
            entry.pins -= 1
            if not entry.pins and entry.retired:
                self._release(entry)

    def _prepare(
        self, adapter: Adapter
    ) -> tuple[Resident, dict[Site, tuple[Tensor, Tensor]] | None]:
        # Building through Adapter.build reuses its validation (state keys, shapes, base).
        model = adapter.build(self.serving)
        reserved = int(getattr(adapter.method, "reserved_positions", 0))
        if adapter.method.type == "lora":
            pairs = {s: (a.detach(), b.detach()) for s, (a, b) in model.method.pairs().items()}
            w = model.head.out.weight.detach().float()
            b = model.head.out.bias.detach().float()
            # The bank stores the pairs in its own dtype, whatever the adapter's.
            lora_bytes = tensor_bytes([t for pair in pairs.values() for t in pair], self.dtype)
            entry = Resident(
                head=adapter.head,
                nbytes=lora_bytes + tensor_bytes([w, b]),
                reserved=reserved,
                scaling=float(model.method.config.scaling),
                head_weight=w,
                head_bias=b,
            )
            return entry, pairs
        model.to(self.dtype)
        nbytes = tensor_bytes([*model.parameters(), *model.buffers()])
        return Resident(head=adapter.head, nbytes=nbytes, reserved=reserved, model=model), None

    def _make_room(self, key: Hashable, nbytes: int, keep: Collection[Hashable]) -> list[Hashable]:
        # Retired entries still pinned by an unreleased plan count until they are released.
        held = self.bytes
        old = self._entries.get(key)
        if old is not None and not old.pins:
            held -= old.nbytes  # replaced once the new version is in
        evictable = (
            (k, e.nbytes)
            for k, e in self._entries.items()  # least recently used first
            if k != key and k not in keep and not e.pins
        )
        victims = choose_victims(evictable, held, nbytes, self.max_bytes)
        for k in victims:
            self._retire(k, self._entries.pop(k))
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(k)
        return victims

    def _retire(self, key: Hashable, entry: Resident) -> None:
        """Take an entry out of service (already out of the ledger); free it when unpinned."""
        self.merged.drop(key)
        if entry.pins:
            entry.retired = True
        else:
            self._release(entry)

    def _release(self, entry: Resident) -> None:
        self.bytes -= entry.nbytes
        if entry.slot is not None:
            self.bank.remove(entry.slot)
