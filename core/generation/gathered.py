"""The running adapters' LoRA pairs, copied out of the bank once per adapter that starts running.

A decode step's :class:`core.generation.adapters.GroupedLoraHooks` multiplies the U running
adapters' pairs as batches ``[U, R, in]`` and ``[U, r, out]``, which must be contiguous copies:
running adapters sit in scattered bank slots, and the bank stores B as ``[out, r]``. Rebuilding
those copies whenever an adapter starts or stops copied every running adapter's pairs again
(313 MB fp32 for 32 SmolLM2 adapters of r=8 on its 7 targets), and under staggered traffic
the running set changes nearly every step (each request that starts or ends changes it). A
decode step + logits of 32 rows on 64 such adapters just after one started, hooks included,
fp32 on 2 quiet AVX2 cores (``python -m bench.generate_engine --batch 32 --adapters 64``,
``step_ms_churn``): 548 ms with the rebuild, 282-309 ms with the copy below; bare 202-228.

Here each running adapter keeps a position: one that stops frees its position, one that starts
is copied into a free one (one adapter's pairs, 9.8 MB on SmolLM2), and an adapter left past
the new end moves down into one, so the U running adapters are always the first U positions
of the buffers and a step reads views of them. The buffers hold U rounded up to 8 positions
(at most the bank's capacity) and are dropped when nothing runs.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

from core.inference.bank import LoraBank

# Targets of one decoder layer that read the same input tensor (core.decoder.forward): their
# A matrices are stacked along the rank axis so one batched matmul gives all their low-rank
# activations. Any other target is a group of its own.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_GROUP_OF = {target: group for group in SHARED_INPUT for target in group}
# A group's targets in a fixed order along its stacked A's rank axis.
_MEMBER_ORDER = {target: i for group in SHARED_INPUT for i, target in enumerate(group)}


GroupKey = tuple[int, str]  # (layer, the first target of the target's group)


def group_key(layer: int, target: str) -> GroupKey:
    return layer, _GROUP_OF.get(target, (target,))[0]


@dataclass(frozen=True)
class SiteGroup:
    """A layer's targets that share an input, for the running adapters (or buffer positions).

    ``a`` is ``[U, R, in]``: each target's ``scale · A`` stacked along the rank axis (R = the
    sum of their bank ranks); ``parts[target] = (start, stop, Bᵀ [U, r, out])`` is that
    target's rank range of ``a`` and its up-projection.
    """

    a: Tensor
    parts: dict[str, tuple[int, int, Tensor]]

    @property
    def num_bytes(self) -> int:
        tensors = (self.a, *(bt for _, _, bt in self.parts.values()))
        return sum(t.numel() * t.element_size() for t in tensors)

    def first(self, n: int) -> SiteGroup:
        """Positions ``0..n-1``: views, contiguous (the leading axis is sliced)."""
        return SiteGroup(self.a[:n], {t: (s, e, bt[:n]) for t, (s, e, bt) in self.parts.items()})


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
        self._buffers: dict[GroupKey, SiteGroup] = {}  # [capacity, ...] each
        self.order: list[Hashable] = []  # the load at each position
        # Plain numbers the owner thread writes, for /metrics to read from another thread.
        self.copies = 0  # adapters copied out of the bank (moves not counted)
        self.num_bytes = 0  # the buffers' bytes, counted when they are allocated

    @property
    def capacity(self) -> int:
        """Positions the buffers hold."""
        return next(iter(self._buffers.values())).a.shape[0] if self._buffers else 0

    def clear(self) -> None:
        """Drop the buffers (nothing runs: their memory goes back)."""
        self._buffers, self.order, self.num_bytes = {}, [], 0

    def update(
        self, bank: LoraBank, running: list[tuple[Hashable, int]]
    ) -> dict[GroupKey, SiteGroup]:
        """Make ``running`` (each adapter's ``(load, bank slot)``) the first positions; return
        every group's views of them, in :attr:`order`."""
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
        except BaseException:  # half-written positions: forget them all
            self.clear()
            raise
        return {key: group.first(n) for key, group in self._buffers.items()}

    def _place(self, bank: LoraBank, running: list[tuple[Hashable, int]]) -> None:
        n = len(running)
        where = {load: pos for pos, load in enumerate(self.order)}
        order: list[Hashable | None] = [None] * n
        for load, _ in running:
            pos = where.get(load)
            if pos is not None and pos < n:
                order[pos] = load  # stays put
        holes = (pos for pos in range(n) if order[pos] is None)
        for load, slot in running:
            pos = where.get(load)
            if pos is not None and pos < n:
                continue
            hole = next(holes)
            if pos is None:  # starts running
                self._copy_in(bank, slot, hole)
            else:  # was past the new end: moves down (its old position is not read again)
                self._move(pos, hole)
            order[hole] = load
        self.order = order

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
            parts, start = {}, 0
            for target, a, b in members:
                # Bᵀ [U, r, out] contiguous: the expand bmm is 3x slower on a transposed view.
                bt = b.new_zeros(capacity, a.shape[1], b.shape[1])
                parts[target] = (start, start + a.shape[1], bt)
                start += a.shape[1]
            a0 = members[0][1]
            self._buffers[key] = SiteGroup(a0.new_zeros(capacity, rank, a0.shape[2]), parts)
        self.order = []

    def _grow(self, capacity: int) -> None:
        kept = len(self.order)
        grown = {}
        for key, group in self._buffers.items():
            a = group.a.new_zeros(capacity, *group.a.shape[1:])
            a[:kept].copy_(group.a[:kept])
            parts = {}
            for target, (start, stop, bt) in group.parts.items():
                wider = bt.new_zeros(capacity, *bt.shape[1:])
                wider[:kept].copy_(bt[:kept])
                parts[target] = (start, stop, wider)
            grown[key] = SiteGroup(a, parts)
        self._buffers = grown

    def _copy_in(self, bank: LoraBank, slot: int, pos: int) -> None:
        sites, scale = bank.site_tensors(), bank.scale[slot]
        for (layer, _), group in self._buffers.items():
            for target, (start, stop, bt) in group.parts.items():
                pair = sites.get((layer, target))
                if pair is None:  # a site the bank dropped: no adapter there has pairs
                    group.a[pos, start:stop].zero_()
                    bt[pos].zero_()
                    continue
                a, b = pair
                torch.mul(a[slot], scale, out=group.a[pos, start:stop])
                bt[pos].copy_(b[slot].t())
        self.copies += 1

    def _move(self, src: int, dst: int) -> None:
        for group in self._buffers.values():
            group.a[dst].copy_(group.a[src])
            for _, _, bt in group.parts.values():
                bt[dst].copy_(bt[src])
