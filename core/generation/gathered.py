"""The running adapters' LoRA pairs, copied out of the bank once per adapter that starts running.

A decode step's :class:`core.generation.adapters.GroupedLoraHooks` multiplies the U running
adapters' pairs as batches ``[U, R, in]`` and ``[U, r, out]``, which must be contiguous copies:
running adapters sit in scattered bank slots, and the bank stores B as ``[out, r]``. Rebuilding
those copies whenever an adapter starts or stops copied every running adapter's pairs again:
SmolLM2, 32 running adapters of r=8 on its 7 targets (313 MB fp32), one decode step + logits
of 32 rows on 2 AVX2 cores, 7 alternations: 241 ms with the copies kept, 514 ms rebuilt,
213 ms bare. Under staggered traffic the running set changes nearly every step (each request
that starts or ends changes it), so the rebuild, not the matmuls, was most of what 64 adapters
cost over HTTP.

Here each running adapter keeps a position: one that starts is copied into a free position
(one adapter's pairs, 9.8 MB on SmolLM2), one that stops frees its position and an adapter from
past the new end moves into it, so the U running adapters are always the first U positions of
buffers allocated for ``capacity`` and a step reads views of them.
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

    def first(self, n: int) -> SiteGroup:
        """Positions ``0..n-1``: views, contiguous (the leading axis is sliced)."""
        return SiteGroup(self.a[:n], {t: (s, e, bt[:n]) for t, (s, e, bt) in self.parts.items()})


class GatheredPairs:
    """Running adapters' pairs by position. Owned by the scheduler's thread, like the bank.

    ``load`` identifies one adapter's stay in one bank slot (the caller's counter): a slot
    reused by another adapter is another load, so positions can never hold stale pairs. The
    copies of running adapters stay valid while they run because their bank slots are pinned;
    a change of the bank's layout (a site added or dropped, a rank grown) rebuilds them all.
    """

    def __init__(self) -> None:
        self._layout = -1  # the bank's layout_version the buffers follow
        self._buffers: dict[GroupKey, SiteGroup] = {}  # [capacity, ...] each
        self._capacity = 0
        self.order: list[Hashable] = []  # the load at each position
        self.copies = 0  # adapters copied out of the bank (moves not counted), for tests

    def update(
        self, bank: LoraBank, running: list[tuple[Hashable, int]]
    ) -> dict[GroupKey, SiteGroup]:
        """Make ``running`` (each adapter's ``(load, bank slot)``) the first positions; return
        every group's views of them, in :attr:`order`."""
        if bank.layout_version != self._layout or not running:
            self._buffers, self._capacity, self.order = {}, 0, []
            self._layout = bank.layout_version
        if not running:
            return {}
        n = len(running)
        if n > self._capacity:
            self._grow(bank, -(-n // 8) * 8)
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
            if pos is None:
                self._copy_in(bank, slot, hole)
            else:  # past the new end: moved down (its old position is not read again)
                self._move(pos, hole)
            order[hole] = load
        self.order = order
        return {key: group.first(n) for key, group in self._buffers.items()}

    def _grow(self, bank: LoraBank, capacity: int) -> None:
        kept = len(self.order)
        buffers: dict[GroupKey, SiteGroup] = {}
        sites = bank.site_tensors()
        by_key: dict[GroupKey, list[tuple[str, Tensor, Tensor]]] = {}
        for (layer, target), (a, b) in sites.items():
            by_key.setdefault(group_key(layer, target), []).append((target, a, b))
        for key, members in by_key.items():
            members.sort(key=lambda m: _MEMBER_ORDER.get(m[0], 0))
            old = self._buffers.get(key)
            rank = sum(a.shape[1] for _, a, _ in members)
            a_buf = members[0][1].new_zeros(capacity, rank, members[0][1].shape[2])
            parts, start = {}, 0
            for target, a, b in members:
                bt = b.new_zeros(capacity, a.shape[1], b.shape[1])
                if old is not None:
                    bt[:kept].copy_(old.parts[target][2][:kept])
                parts[target] = (start, start + a.shape[1], bt)
                start += a.shape[1]
            if old is not None:
                a_buf[:kept].copy_(old.a[:kept])
            buffers[key] = SiteGroup(a_buf, parts)
        self._buffers, self._capacity = buffers, capacity

    def _copy_in(self, bank: LoraBank, slot: int, pos: int) -> None:
        sites, scale = bank.site_tensors(), bank.scale[slot]
        for (layer, _), group in self._buffers.items():
            for target, (start, stop, bt) in group.parts.items():
                a, b = sites[(layer, target)]
                torch.mul(a[slot], scale, out=group.a[pos, start:stop])
                bt[pos].copy_(b[slot].t())
        self.copies += 1

    def _move(self, src: int, dst: int) -> None:
        for group in self._buffers.values():
            group.a[dst].copy_(group.a[src])
            for _, _, bt in group.parts.values():
                bt[dst].copy_(bt[src])
