"""The running adapters' LoRA pairs, copied out of the bank once per adapter that starts running.

A decode step's :class:`core.generation.adapters.BagLoraHooks` reads the running adapters'
pairs as embedding tables (``(scale·A)ᵀ`` rows by input dim, ``Bᵀ`` rows by rank, in the bank's
dtype, the base's), which must be copies: the bank stores ``A [r, in]`` and ``B [out, r]`` per
slot, as a prefill's matmuls read them. Rebuilding those copies whenever an adapter
starts or stops copied every running adapter's pairs again (313 MB fp32 for 32 SmolLM2 adapters
of r=8 on its 7 targets), and under staggered traffic the running set changes nearly every step
(each request that starts or ends changes it). A decode step + logits of 32 rows on 64 such
adapters just after one started, hooks included, fp32 on 2 quiet AVX2 cores (``python -m
bench.generate_engine --batch 32 --adapters 64``, ``step_ms_churn``): 548 ms with the rebuild,
282-309 ms with one copy per adapter that starts; bare 202-228.

Here each running adapter keeps a position while it runs: one that stops frees its position,
one that starts is copied into a free one (one adapter's pairs, 9.8 MB fp32 on SmolLM2). The
buffers hold the running count rounded up to 8 positions (at most the bank's capacity), grow
when more run, and are dropped when nothing runs.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from torch import Tensor

from core.inference.bank import LoraBank

# Targets of one decoder layer that read the same input tensor (core.decoder.forward): their
# A matrices are stacked along the rank axis so one pass over the input gives all their
# low-rank activations. Any other target is a group of its own.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_GROUP_OF = {target: group for group in SHARED_INPUT for target in group}
# A group's targets in a fixed order along its stacked A's rank axis.
_MEMBER_ORDER = {target: i for group in SHARED_INPUT for i, target in enumerate(group)}


GroupKey = tuple[int, str]  # (layer, the first target of the target's group)


def group_key(layer: int, target: str) -> GroupKey:
    return layer, _GROUP_OF.get(target, (target,))[0]


@dataclass(frozen=True)
class SiteGroup:
    """A layer's targets that share an input, for every buffer position, as embedding tables.

    ``a`` is ``[capacity·in + 1, R]``: position p's rows ``p·in .. p·in+in-1`` hold its targets'
    ``(scale · A)ᵀ`` side by side along R (the sum of their bank ranks), and the last row is
    zeros, for tokens without an adapter. ``parts[target] = (start, stop, Bᵀ [capacity·r + 1,
    out])`` is that target's rank range of ``a`` and its up-projection, position p at rows
    ``p·r .. p·r+r-1``, and the last row zeros too: a token without an adapter must read no
    adapter's rows, not even weighted by 0 (0 · NaN is NaN).
    """

    a: Tensor
    parts: dict[str, tuple[int, int, Tensor]]
    n_in: int
    capacity: int

    @property
    def zero_row(self) -> int:
        return self.capacity * self.n_in

    @property
    def num_bytes(self) -> int:
        tensors = (self.a, *(bt for _, _, bt in self.parts.values()))
        return sum(t.numel() * t.element_size() for t in tensors)


class GatheredPairs:
    """Running adapters' pairs by position. Owned by the scheduler's thread, like the bank.

    ``load`` identifies one adapter's stay in one bank slot (the caller's counter): a slot
    reused by another adapter is another load, so positions can never hold stale pairs. The
    copies of running adapters stay valid while they run because their bank slots are pinned.
    A site the bank adds, or whose rank it grows, rebuilds the buffers (every running adapter
    copied again); a site it drops stays in them, zeros for any adapter copied in later, so an
    idle adapter that comes and goes with a site of its own costs the running ones nothing.
    """

    def __init__(self) -> None:
        self._layout = -1  # the bank's layout_version the buffers were last checked against
        self._buffers: dict[GroupKey, SiteGroup] = {}
        self.position: dict[Hashable, int] = {}  # each running load's position
        # Plain numbers the owner thread writes, for /metrics to read from another thread.
        self.copies = 0  # adapters copied out of the bank
        self.num_bytes = 0  # the buffers' bytes, counted when they are allocated

    @property
    def capacity(self) -> int:
        """Positions the buffers hold."""
        return next(iter(self._buffers.values())).capacity if self._buffers else 0

    def clear(self) -> None:
        """Drop the buffers (nothing runs: their memory goes back)."""
        self._buffers, self.position, self.num_bytes = {}, {}, 0

    def update(
        self, bank: LoraBank, running: list[tuple[Hashable, int]]
    ) -> dict[GroupKey, SiteGroup]:
        """Give each of ``running`` (each adapter's ``(load, bank slot)``) a position in
        :attr:`position`, copying those that were not running; return every group's tables."""
        n = len(running)
        if not n:
            self.clear()
            return {}
        if bank.layout_version != self._layout:
            if not self._fits(bank):
                self.clear()
            self._layout = bank.layout_version
        try:
            if n > self.capacity:
                # Room for a few more than run now, never more than the bank holds.
                capacity = max(n, min(-(-n // 8) * 8, bank.capacity))
                if self._buffers:
                    self._grow(capacity)
                else:
                    self._build(bank, capacity)
                self.num_bytes = sum(g.num_bytes for g in self._buffers.values())
            self._place(bank, running)
        except BaseException:  # a half-written position: forget them all
            self.clear()
            raise
        return self._buffers

    def _place(self, bank: LoraBank, running: list[tuple[Hashable, int]]) -> None:
        """Adapters still running keep their positions; those that start take freed ones."""
        placed = {load: self.position[load] for load, _ in running if load in self.position}
        taken = set(placed.values())
        free = (pos for pos in range(self.capacity) if pos not in taken)
        for load, slot in running:
            if load not in placed:
                pos = next(free)
                self._copy_in(bank, slot, pos)
                placed[load] = pos
        self.position = placed

    def _fits(self, bank: LoraBank) -> bool:
        """Every site of the bank is in the buffers, at its bank rank."""
        for (layer, target), (a, _) in bank.site_tensors().items():
            group = self._buffers.get(group_key(layer, target))
            part = group.parts.get(target) if group is not None else None
            if part is None or part[1] - part[0] != a.shape[1]:
                return False
        return True

    def _build(self, bank: LoraBank, capacity: int) -> None:
        by_key: dict[GroupKey, list[tuple[str, Tensor, Tensor]]] = {}
        for (layer, target), (a, b) in bank.site_tensors().items():
            by_key.setdefault(group_key(layer, target), []).append((target, a, b))
        for key, members in by_key.items():
            members.sort(key=lambda m: _MEMBER_ORDER.get(m[0], 0))
            rank = sum(a.shape[1] for _, a, _ in members)
            n_in = members[0][1].shape[2]
            parts, start = {}, 0
            for target, a, b in members:
                bt = b.new_zeros(capacity * a.shape[1] + 1, b.shape[1])
                parts[target] = (start, start + a.shape[1], bt)
                start += a.shape[1]
            table = members[0][1].new_zeros(capacity * n_in + 1, rank)
            self._buffers[key] = SiteGroup(table, parts, n_in, capacity)
        self.position = {}

    def _grow(self, capacity: int) -> None:
        """More positions: the old positions' rows copied as they are, then zeros (the new
        positions and the tables' zero rows, which move to the new ends)."""
        grown = {}
        for key, group in self._buffers.items():
            kept = group.capacity * group.n_in
            a = group.a.new_zeros(capacity * group.n_in + 1, group.a.shape[1])
            a[:kept].copy_(group.a[:kept])
            parts = {}
            for target, (start, stop, bt) in group.parts.items():
                wider = bt.new_zeros(capacity * (stop - start) + 1, bt.shape[1])
                wider[: bt.shape[0] - 1].copy_(bt[:-1])
                parts[target] = (start, stop, wider)
            grown[key] = SiteGroup(a, parts, group.n_in, capacity)
        self._buffers = grown

    def _copy_in(self, bank: LoraBank, slot: int, pos: int) -> None:
        sites, scale = bank.site_tensors(), bank.scale[slot]
        for (layer, _), group in self._buffers.items():
            rows = group.a[pos * group.n_in : (pos + 1) * group.n_in]
            for target, (start, stop, bt) in group.parts.items():
                r = stop - start
                pair = sites.get((layer, target))
                if pair is None:  # a site the bank dropped: no adapter there has pairs
                    rows[:, start:stop].zero_()
                    bt[pos * r : (pos + 1) * r].zero_()
                    continue
                a, b = pair
                rows[:, start:stop].copy_(a[slot].t() * scale)
                bt[pos * r : (pos + 1) * r].copy_(b[slot].t())
        self.copies += 1
