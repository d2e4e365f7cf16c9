"""Stacked LoRA weights of many resident adapters, for mixed-adapter batches (Punica's BGMV).

For every (layer, target) site that at least one resident adapter targets the bank keeps

* ``a[slot, r_max, in]`` and ``b[slot, out, r_max]``: every adapter's pair, zero-padded to the
  site's largest rank (padding rows of A / columns of B with zeros adds exactly nothing);
* one ``scale[slot]`` per adapter (``alpha / r`` or ``alpha / sqrt(r)``).

An adapter that does not target a site has zeros there, so adapters with different ranks,
target sets and layer subsets share one set of tensors. Only sites some resident adapter targets
are allocated (a q+v bank does not pay for all-linear).

Rows without an adapter are not given a slot of zeros: :class:`MixedLoraHooks` leaves them out
of the LoRA matmuls. That keeps "no adapter" free and lets ``capacity`` adapters fit exactly in
``capacity`` slots (1024 r=8 q+v adapters of MiniLM: 288 MiB fp32, no spare power-of-two slot).

Loading or unloading one adapter writes (zeroes) its slot only. Capacity grows geometrically
(copying the stacked tensors once per doubling); a site's rank grows when a bigger rank arrives.
Freed slots are reused lowest first. Not thread-safe: only the engine's owner thread writes it.
Forwards on other threads read through :class:`MixedLoraHooks`, which snapshots the site
tensors when it is built, so a load that grows the bank (new tensors) or writes another slot
meanwhile cannot disturb it, as long as the slots it reads are not freed until it is done (the
engine pins them).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from core.encoder import EncoderConfig, EncoderHooks
from core.tensors import tensor_bytes

Site = tuple[int, str]  # (layer, target)


@dataclass
class _SiteWeights:
    a: Tensor  # [capacity, r, in]
    b: Tensor  # [capacity, out, r]
    users: int = 0  # resident adapters targeting this site; the site is freed at 0

    @property
    def rank(self) -> int:
        return self.a.shape[1]


class LoraBank:
    """Stacked LoRA pairs of resident adapters, one slot per adapter."""

    def __init__(
        self,
        config: EncoderConfig,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        initial_capacity: int = 8,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self._capacity = max(1, initial_capacity)
        # fp32 whatever the pairs' dtype: a scale such as alpha / sqrt(r) is not a bf16 number.
        self.scale = torch.zeros(self._capacity, device=self.device, dtype=torch.float32)
        self._sites: dict[Site, _SiteWeights] = {}
        self._free: list[int] = list(range(self._capacity))  # a heap: lowest slot first
        self._slot_sites: dict[int, tuple[Site, ...]] = {}
        self._slot_rank: dict[int, int] = {}
        # Counts changes of which sites exist and their ranks (not of slots' contents), for
        # copies of slots that must be rebuilt when the layout changes (core.generation).
        self.layout_version = 0

    # --- inspection -----------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._slot_sites)

    def site(self, layer: int, target: str) -> _SiteWeights | None:
        return self._sites.get((layer, target))

    @property
    def sites(self) -> list[Site]:
        return list(self._sites)

    def site_tensors(self) -> dict[Site, tuple[Tensor, Tensor]]:
        """Every allocated site's stacked ``(a, b)`` as of now (growth replaces them)."""
        return {site: (w.a, w.b) for site, w in self._sites.items()}

    @property
    def num_bytes(self) -> int:
        """Bytes the bank holds (all allocated slots, used or free)."""
        return tensor_bytes([self.scale, *(t for s in self._sites.values() for t in (s.a, s.b))])

    def slot_pairs(self, slot: int) -> dict[Site, tuple[Tensor, Tensor]]:
        """Views of one adapter's ``(A [r, in], B [out, r])`` at its own rank (no padding)."""
        r = self._slot_rank[slot]
        return {
            site: (self._sites[site].a[slot, :r], self._sites[site].b[slot, :, :r])
            for site in self._slot_sites[slot]
        }

    # --- writing --------------------------------------------------------------------------

    def add(self, pairs: Mapping[Site, tuple[Tensor, Tensor]], scaling: float) -> int:
        """Write one adapter into a free slot and return the slot.

        ``pairs`` maps (layer, target) to ``(A [r, in], B [out, r])``. Only this slot is
        written; other slots keep their values (and their storage unless the bank grows).
        """
        if not pairs:
            raise ValueError("a LoRA adapter needs at least one (layer, target) pair")
        ranks = {a.shape[0] for a, _ in pairs.values()}
        if len(ranks) != 1:
            raise ValueError(f"all pairs of one adapter must share a rank, got {sorted(ranks)}")
        r = ranks.pop()
        for (layer, target), (a, b) in pairs.items():
            n_in, n_out = self.config.linear_shape(target)
            if not 0 <= layer < self.config.num_hidden_layers:
                raise ValueError(f"layer {layer} out of range")
            if tuple(a.shape) != (r, n_in) or tuple(b.shape) != (n_out, r):
                raise ValueError(
                    f"{(layer, target)}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                    f"({r}, {n_in}) / ({n_out}, {r})"
                )
        if not self._free:
            self._grow_capacity(self._capacity * 2)
        slot = heapq.heappop(self._free)
        try:
            for site, (a, b) in pairs.items():
                w = self._site_for(site, r)
                # Free slots are all-zero everywhere, so writing the pair's block is enough.
                w.a[slot, :r].copy_(a)
                w.b[slot, :, :r].copy_(b)
            self.scale[slot] = scaling
        except BaseException:
            self._clear_slot(slot, list(pairs))
            heapq.heappush(self._free, slot)
            raise
        for site in pairs:
            self._sites[site].users += 1
        self._slot_sites[slot] = tuple(pairs)
        self._slot_rank[slot] = r
        return slot

    def remove(self, slot: int) -> None:
        """Zero one slot and make it reusable; sites no adapter targets any more are freed."""
        sites = self._slot_sites.pop(slot)
        del self._slot_rank[slot]
        self._clear_slot(slot, sites)
        for site in sites:
            w = self._sites[site]
            w.users -= 1
            if w.users == 0:
                del self._sites[site]
                self.layout_version += 1
        heapq.heappush(self._free, slot)

    def _clear_slot(self, slot: int, sites: list[Site] | tuple[Site, ...]) -> None:
        for site in sites:
            w = self._sites.get(site)
            if w is not None:
                w.a[slot].zero_()
                w.b[slot].zero_()
        self.scale[slot] = 0

    def _site_for(self, site: Site, rank: int) -> _SiteWeights:
        w = self._sites.get(site)
        n_in, n_out = self.config.linear_shape(site[1])
        if w is None:
            w = _SiteWeights(
                a=self._zeros(self._capacity, rank, n_in),
                b=self._zeros(self._capacity, n_out, rank),
            )
            self._sites[site] = w
            self.layout_version += 1
        elif w.rank < rank:
            # Grow this site's rank only: zero padding is exact for the adapters already here.
            a, b = self._zeros(self._capacity, rank, n_in), self._zeros(self._capacity, n_out, rank)
            a[:, : w.rank].copy_(w.a)
            b[:, :, : w.rank].copy_(w.b)
            w.a, w.b = a, b
            self.layout_version += 1
        return w

    def _grow_capacity(self, capacity: int) -> None:
        old = self._capacity
        scale = torch.zeros(capacity, device=self.device, dtype=torch.float32)
        scale[:old].copy_(self.scale)
        grown: dict[Site, tuple[Tensor, Tensor]] = {}
        for site, w in self._sites.items():
            a = self._zeros(capacity, *w.a.shape[1:])
            b = self._zeros(capacity, *w.b.shape[1:])
            a[:old].copy_(w.a)
            b[:old].copy_(w.b)
            grown[site] = (a, b)
        # Swap in only after every allocation succeeded, so an OOM leaves the bank as it was.
        self.scale = scale
        for site, (a, b) in grown.items():
            self._sites[site].a, self._sites[site].b = a, b
        for slot in range(old, capacity):
            heapq.heappush(self._free, slot)
        self._capacity = capacity

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(*shape, device=self.device, dtype=self.dtype)


class MixedLoraHooks(EncoderHooks):
    """``y[i] += scale[s_i] · B[s_i] (A[s_i] x_i)`` for every row of a batch in one go.

    ``slots[i]`` is row i's bank slot, or -1 for a row without an adapter. Per site, the rows'
    A and B are gathered with ``index_select`` and applied with two batched matmuls; the second
    accumulates into ``y`` in place (``baddbmm_``). Rows without an adapter are left out of the
    matmuls (a row subset, then ``index_add_``), and a batch with none skips the bank entirely.

    Measured on MiniLM shapes (32 rows x 64 tokens, r=8, 2 CPU cores), per site: gather+bmm
    0.34-0.48 ms for 1 to 32 distinct adapters; a dense ``x @ A_all`` over the batch's distinct
    adapters (one-hot masked) ties at 1 adapter, then grows to 4-5 ms at 32; a Python loop per
    adapter with segment matmuls costs 1.3-5 ms. Gather+bmm is ~1.3% of the base forward.

    It keeps the site tensors of the moment it is built (see the module docstring), so it can
    run while the bank changes.
    """

    def __init__(self, bank: LoraBank, slots: Tensor) -> None:
        self.sites = bank.site_tensors()
        active = slots >= 0
        self.rows: Tensor | None = None
        if not bool(active.all()):
            self.rows = active.nonzero().squeeze(1)
            slots = slots.index_select(0, self.rows)
        self.slots = slots
        self.scale = bank.scale.index_select(0, slots).view(-1, 1, 1)

    def linear(self, layer: int, target: str, x: Tensor, y: Tensor) -> Tensor:
        site = self.sites.get((layer, target))
        if site is None:
            return y
        a = site[0].index_select(0, self.slots)  # [n, r, in]
        b = site[1].index_select(0, self.slots)  # [n, out, r]
        if self.rows is None:
            h = torch.bmm(x, a.transpose(1, 2)).mul_(self.scale)
            return y.baddbmm_(h, b.transpose(1, 2))
        h = torch.bmm(x.index_select(0, self.rows), a.transpose(1, 2)).mul_(self.scale)
        return y.index_add_(0, self.rows, torch.bmm(h, b.transpose(1, 2)))
