"""The LoRA adapters running sequences use, stacked in one bank, pinned while in use.

Each sequence's LoRA delta comes from :class:`core.inference.bank.LoraBank` by its adapter's
slot (:class:`GroupedLoraHooks`), so sequences of different adapters, ranks and target sets, and
sequences of the bare base, share one decode step. An adapter is pinned by every running
sequence that uses it and never evicted while pinned; unpinned adapters stay resident (least
recently used evicted first) until the bank holds ``max_adapters``. Owned by the scheduler's
thread, like the bank.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from core.decoder.forward import NO_HOOKS, DecoderWeights, LinearHooks
from core.generation.gathered import GatheredPairs, GroupKey, SiteGroup, group_key
from core.hardware import torch_threads
from core.inference.bank import LoraBank, Site

# Threads the LoRA side path computes on, whatever the step's count: its kernels are small
# (r=8 columns, a few rows in a decode step), and each wakes the step's other threads for less
# work than that costs. SmolLM2 bf16 on 2 avx512_bf16 EPYC cores, the step on 2 threads, the
# side path on 2 -> 1: a 32-row decode step + logits on 64 adapters 180 -> 122 and 193 -> 167 ms
# in two runs, bare 92-109 (python -m bench.generate_engine --batch 32 --adapters 64
# --new-tokens 16 --rounds 9 --threads 2); a prefill and its first token, one 100-token prompt
# with an adapter 327 -> 197 ms (base 154-184), eight on eight adapters 1,749 -> 1,029, one
# 1,000-token prompt 2,092 -> 1,941 (base 1,082-1,248). On one thread nothing changes.
SIDE_PATH_THREADS = 1


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
            dtype=lora_dtype(weights),
            initial_capacity=min(max_adapters, 8),
        )
        self.max_adapters = max_adapters
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # least recent first
        self._retired: dict[int, _Entry] = {}  # by slot
        # Each slot's current load (a new number whenever an adapter is written into it), so
        # the running adapters' gathered copies can tell a reused slot from the same adapter.
        self._loads = itertools.count()
        self._load_of: dict[int, int] = {}  # by slot
        self.gathered = GatheredPairs()
        self._pins = 0  # over all adapters: at 0 nothing runs, and the gathered copies go

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
                self._remove(self._entries.pop(victim).slot)
            dev, dtype = self.bank.device, self.bank.dtype
            pairs = {
                site: (a.to(dev, dtype), b.to(dev, dtype)) for site, (a, b) in adapter.pairs.items()
            }
            entry = _Entry(self.bank.add(pairs, adapter.scaling))
            self._load_of[entry.slot] = next(self._loads)
            self._entries[adapter.key] = entry
        self._entries.move_to_end(adapter.key)
        entry.pins += 1
        self._pins += 1
        return entry.slot

    def release(self, slot: int, key: Hashable) -> None:
        """One pin fewer on the adapter ``key`` loaded at ``slot``."""
        entry = self._retired.get(slot)
        if entry is None:
            entry = self._entries[key]
        entry.pins -= 1
        self._pins -= 1
        if self._pins == 0:
            self.gathered.clear()
        if entry.retired and entry.pins == 0:
            del self._retired[slot]
            self._remove(slot)

    def invalidate(self, key: Hashable) -> None:
        """Forget ``key`` (its adapter was deleted or replaced): new requests load it anew;
        sequences still running with it finish with the weights they started with."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if entry.pins == 0:
            self._remove(entry.slot)
        else:
            entry.retired = True
            self._retired[entry.slot] = entry

    def _remove(self, slot: int) -> None:
        self.bank.remove(slot)
        del self._load_of[slot]

    def hooks(self, slots: Tensor) -> LinearHooks:
        """Hooks adding each row's LoRA delta (``slots[i]`` = -1: the bare base), for decode
        steps: the adapters these rows use become :attr:`gathered`'s running set (copying
        those that were not running in the previous call, or all of them where the bank has
        since added a site or grown a rank).
        """
        rows_of: dict[int, list[int]] = {}
        for row, slot in enumerate(slots.tolist()):
            if slot >= 0:
                rows_of.setdefault(slot, []).append(row)
        running = [(self._load_of[slot], slot) for slot in rows_of]
        pairs = self.gathered.update(self.bank, running)
        if not running:
            return NO_HOOKS
        slot_of = dict(running)
        groups = [rows_of[slot_of[load]] for load in self.gathered.order]
        return GroupedLoraHooks(pairs, groups, slots.shape[0], slots.device)

    def segment_hooks(self, segments: list[tuple[int, int, int]]) -> LinearHooks:
        """Hooks for a packed prefill: ``(slot, start, stop)`` = rows ``start..stop-1`` are one
        prompt's tokens, with the adapter at bank ``slot`` (-1: the bare base)."""
        runs = [(slot, start, stop) for slot, start, stop in segments if slot >= 0]
        if not runs:
            return NO_HOOKS
        return SegmentLoraHooks(self.bank.site_tensors(), self.bank.scale.tolist(), runs)


def lora_dtype(weights: DecoderWeights) -> torch.dtype:
    """The bank's dtype: the base's, but fp32 under a bf16 base on a CPU, where the deltas' small
    matmuls (r=8, a few rows) are slower in bf16 than in fp32 (no AMX tiles for such shapes,
    conversions in every kernel); the hooks convert a site's input up and add the delta back
    down. SmolLM2 in bf16, 16 adapters, one decode step + logits, 9 alternations on 2 AMX cores
    at load 5.7: 32 rows 735 ms with a bf16 bank, 635 with fp32 (bare 403); 8 rows 634 vs 539
    (bare 334)."""
    if weights.device.type == "cpu" and weights.dtype == torch.bfloat16:
        return torch.float32
    return weights.dtype


class SegmentLoraHooks:
    """``y[rows] += scale · B (A x[rows])`` per prompt of a packed prefill, straight from the bank.

    A prompt's tokens are contiguous rows with one adapter, so each prompt's delta is two small
    matmuls on its rows and its adapter's bank views: nothing gathered or copied. Grouping the
    rows by adapter instead (:class:`GroupedLoraHooks`, padded to the largest group) copied
    every site's inputs and deltas of ~2000 prompt tokens, ~1.3 s of a 5 s SmolLM2 prefill of
    16 prompts on 2 cores. A prompt's rows meet the same matmuls as its prefill alone.
    """

    def __init__(
        self,
        sites: dict[Site, tuple[Tensor, Tensor]],
        scale: list[float],
        runs: list[tuple[int, int, int]],
    ) -> None:
        self.sites = sites
        self.scale = scale  # by bank slot
        self.runs = runs

    def weight(self, layer: int, target: str, weight: Tensor) -> Tensor:
        return weight

    def linear(self, layer: int, target: str, x: Tensor, y: Tensor) -> Tensor:
        stacked = self.sites.get((layer, target))
        if stacked is None:
            return y
        a, b = stacked
        with torch_threads(SIDE_PATH_THREADS):
            flat_x = x.reshape(-1, x.shape[-1]).to(a.dtype)
            flat_y = y.view(-1, y.shape[-1])
            for slot, start, stop in self.runs:
                h = F.linear(flat_x[start:stop], a[slot])
                rows = flat_y[start:stop]
                if rows.dtype == h.dtype:  # scale and add inside the expand matmul: 2 kernels
                    rows.addmm_(h, b[slot].t(), alpha=self.scale[slot])
                else:
                    # In the bank's dtype, rounded once into y's. Not ``rows.add_(delta)``: an
                    # in-place add across dtypes goes through a temporary and a casting copy
                    # (a 1,000-token prompt on 2 avx512_bf16 EPYC cores, one thread: the
                    # deltas' 752 -> 614 ms, the same top log-probabilities).
                    rows.copy_(
                        torch.addmm(rows.to(h.dtype), h, b[slot].t(), alpha=self.scale[slot])
                    )
        return y


class GroupedLoraHooks:
    """``y[i] += scale[s_i] · B[s_i] (A[s_i] x_i)`` from the running adapters' gathered pairs.

    Rows are grouped by adapter (groups in :class:`GatheredPairs`' order): per site, the U
    distinct adapters' pairs meet the rows' inputs ``[U, m, in]`` (m = the largest group,
    others padded with zero rows) in two batched matmuls, and each row adds its own delta.
    Targets sharing an input (q/k/v, gate/up: ``SHARED_INPUT``) share the first matmul:
    the first of them to be called computes all their low-rank activations ``[U, m, R]``
    from the stacked ``scale · A`` and keeps them for the others, which only expand their rank
    range (same arithmetic as one matmul per target: a strided view of a row meets the same
    dot products), and ``scale`` is folded into the gathered A. Where the grouped rows happen
    to lie in batch order (each adapter's rows consecutive and equally many, in the gathered
    order; bare rows only before or after them), inputs and deltas are views of ``x`` and
    ``y``; otherwise the rows' inputs and deltas are gathered ([rows, in] and [rows, out]).
    A SmolLM2 layer (7 targets) then runs 11 matmuls and 7 adds, where one shrink matmul,
    scale, expand matmul and add per target ran 28 kernels (50 with rows out of order).

    The fewer kernels save little (SmolLM2, 64 adapters, the 210 sites of one decode step
    alone, fp32, 2 AMX cores at load 7: rows in slot order 8 rows 36.0 -> 32.4 ms, 32 rows
    82.6 -> 80.7 ms; rows out of order 30.7 -> 24.9, 71.0 -> 64.1 ms): the cost is the
    matmuls, 92% of it, and they stream every running adapter's pairs from memory each step
    (U x 9.8 MB fp32, ~8 GB/s a matmul at that load), so it grows with the distinct adapters
    in the batch. The same pairs in bf16 halve the bytes but ran 1.5-2x slower (bf16 kernels
    for these shapes; converting them to fp32 per site costs more than it saves).

    Why not gather A and B per row every step (:class:`core.inference.bank.MixedLoraHooks`'
    BGMV): on SmolLM2 (all 7 targets, r=8) one adapter is 9.8 MB fp32, so 32 rows copied 312 MB
    per decode step, on top of the bare step's 540 MB of weights. Here each adapter is copied
    once when it starts running (:class:`core.generation.gathered.GatheredPairs`): decoding
    copies no weights. The price: while adapters run, their pairs are held twice.
    A dense ``x [B, in] @ A_all [in, U·r]`` with a one-hot row mask was measured too: its
    multiply-adds grow with U·B (5 GFLOP per step at B=U=32, as much as the base's), slower.
    """

    def __init__(
        self,
        pairs: Mapping[GroupKey, SiteGroup],
        groups: list[list[int]],
        bsz: int,
        device: torch.device,
    ) -> None:
        self.pairs = pairs  # the U running adapters', in the groups' order
        self.n_groups = len(groups)  # U
        self.device = device
        self.bsz = bsz
        self.most = max(map(len, groups))
        self.padded = any(len(g) < self.most for g in groups)
        # Grouped position of every row (the zero row U·m for rows without an adapter), and
        # the row at every grouped position (the zero row B for padding).
        self.position = [len(groups) * self.most] * bsz
        self.source = [bsz] * (len(groups) * self.most)
        for u, rows in enumerate(groups):
            for j, row in enumerate(rows):
                self.position[row] = u * self.most + j
                self.source[u * self.most + j] = row
        self.bare = sum(map(len, groups)) < bsz
        # Grouped rows that are the batch rows first..first+U·m-1 in order: views, no copies.
        first = self.source[0]
        in_order = not self.padded and self.source == list(range(first, first + len(self.source)))
        self.rows: tuple[int, int] | None = (first, first + len(self.source)) if in_order else None
        self._token_index: dict[int, tuple[Tensor, Tensor]] = {}
        # The last group's input and low-rank activations, for its other targets.
        self._low: tuple[Tensor, SiteGroup, Tensor] | None = None

    def weight(self, layer: int, target: str, weight: Tensor) -> Tensor:
        return weight

    def _tokens(self, seq: int) -> tuple[Tensor, Tensor]:
        """``(source, position)`` per token: :attr:`source` and :attr:`position` with each
        row standing for its ``seq`` tokens (the zero rows stay single)."""
        index = self._token_index.get(seq)
        if index is None:
            device = self.device

            def expand(rows: list[int], zero: int) -> Tensor:
                # Row ``zero`` is the one zero row, after the ``zero * seq`` real tokens.
                return torch.tensor(
                    [zero * seq if r == zero else r * seq + t for r in rows for t in range(seq)],
                    device=device,
                )

            index = (expand(self.source, self.bsz), expand(self.position, len(self.source)))
            self._token_index[seq] = index
        return index

    def _grouped(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """``x`` ``[B, seq, in]`` as the grouped rows ``[U, m·seq, in]`` in ``dtype``."""
        bsz, seq, n_in = x.shape
        if self.rows is not None:
            first, stop = self.rows
            return x[first:stop].to(dtype).view(self.n_groups, -1, n_in)
        flat = x.reshape(bsz * seq, n_in).to(dtype)
        if self.padded:
            flat = torch.cat((flat, flat.new_zeros(1, n_in)))
        source, _ = self._tokens(seq)
        return flat.index_select(0, source).view(self.n_groups, -1, n_in)

    def linear(self, layer: int, target: str, x: Tensor, y: Tensor) -> Tensor:
        group = self.pairs.get(group_key(layer, target))
        part = group.parts.get(target) if group is not None else None
        if group is None or part is None:
            return y
        with torch_threads(SIDE_PATH_THREADS):
            return self._add_deltas(group, part, x, y)

    def _add_deltas(
        self, group: SiteGroup, part: tuple[int, int, Tensor], x: Tensor, y: Tensor
    ) -> Tensor:
        if self._low is not None and self._low[0] is x and self._low[1] is group:
            low = self._low[2]
        else:
            low = torch.bmm(self._grouped(x, group.a.dtype), group.a.transpose(1, 2))
            self._low = (x, group, low)  # [U, m·seq, R]
        start, stop, bt = part
        delta = torch.bmm(low[:, :, start:stop], bt)  # [U, m·seq, out]
        if self.rows is not None:
            first, last = self.rows
            y[first:last].view_as(delta).add_(delta)
            return y
        bsz, seq, n_out = y.shape
        delta = delta.view(-1, n_out)
        if self.bare:  # rows without an adapter: the zero row's
            delta = torch.cat((delta, delta.new_zeros(1, n_out)))
        _, position = self._tokens(seq)
        y.view(bsz * seq, n_out).add_(delta.index_select(0, position))
        return y
