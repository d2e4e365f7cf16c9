"""The LoRA adapters running sequences use, stacked in one bank, pinned while in use.

Each sequence's LoRA delta comes from its adapter's pairs in :class:`core.inference.bank.LoraBank`
(a prefill's, :class:`SegmentLoraHooks`) or from the running adapters' copies of them (a decode
step's, :class:`BagLoraHooks`), so sequences of different adapters, ranks and target sets, and
sequences of the bare base, share one step. An adapter is pinned by every running
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
            dtype=weights.dtype,
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

    def pin(self, slot: int, key: Hashable) -> None:
        """One pin more on the adapter ``key`` loaded at ``slot``, which is pinned already (a
        request's candidate starting after its first ones): the weights they run with, even
        where ``key`` was invalidated since."""
        entry = self._pinned(slot, key)
        entry.pins += 1
        self._pins += 1

    def release(self, slot: int, key: Hashable) -> None:
        """One pin fewer on the adapter ``key`` loaded at ``slot``."""
        entry = self._pinned(slot, key)
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

    def _pinned(self, slot: int, key: Hashable) -> _Entry:
        """The entry of the adapter ``key`` pinned at ``slot`` (retired there, if invalidated)."""
        entry = self._retired.get(slot)
        return entry if entry is not None else self._entries[key]

    def _remove(self, slot: int) -> None:
        self.bank.remove(slot)
        del self._load_of[slot]

    def hooks(self, slots: Tensor) -> LinearHooks:
        """Hooks adding each row's LoRA delta (``slots[i]`` = -1: the bare base), for decode
        steps: the adapters these rows use become :attr:`gathered`'s running set (copying
        those that were not running in the previous call, or all of them where the bank has
        since added a site or grown a rank).
        """
        slot_ids = slots.tolist()
        running = [(self._load_of[slot], slot) for slot in dict.fromkeys(slot_ids) if slot >= 0]
        pairs = self.gathered.update(self.bank, running)
        if not running:
            return NO_HOOKS
        pos_of = {slot: self.gathered.position[load] for load, slot in running}
        position = [pos_of.get(slot, -1) for slot in slot_ids]
        return BagLoraHooks(pairs, position, slots.device)

    def segment_hooks(self, segments: list[tuple[int, int, int]]) -> LinearHooks:
        """Hooks for a packed prefill: ``(slot, start, stop)`` = rows ``start..stop-1`` are one
        prompt's tokens, with the adapter at bank ``slot`` (-1: the bare base)."""
        runs = [(slot, start, stop) for slot, start, stop in segments if slot >= 0]
        if not runs:
            return NO_HOOKS
        return SegmentLoraHooks(self.bank.site_tensors(), self.bank.scale.tolist(), runs)


class SegmentLoraHooks:
    """``y[rows] += scale · B (A x[rows])`` per prompt of a packed prefill, straight from the bank.

    A prompt's tokens are contiguous rows with one adapter, so each prompt's delta is two small
    matmuls on its rows and its adapter's bank views: nothing gathered or copied. Grouping the
    rows by adapter instead (as decode steps once did, padded to the largest group) copied
    every site's inputs and deltas of ~2000 prompt tokens, ~1.3 s of a 5 s SmolLM2 prefill of
    16 prompts on 2 cores. A prompt's rows meet the same matmuls as its prefill alone.

    The bank holds the pairs in the base's dtype. Under a bf16 base on a CPU it held fp32, so
    every site converted the prompt's inputs up and its outputs up and back down; SmolLM2 in
    bf16, 8 adapters on all seven linears, r=8, 2 avx512_bf16 EPYC cores (no AMX), one process
    alternating both (scratch, medians of 6, two runs), the deltas' cost over the bare
    prefill: one 1,000-token prompt 361-519 -> 70-100 ms, eight 100-token prompts 240-244 ->
    158-179, one 100-token prompt 34-35 -> 24-31; the final hidden states as close to an
    all-fp32 prefill's either way (1.2-2.1% against 1.3-1.4%, the bare bf16 base's own
    1.1-1.4%).
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
            flat_x = x.reshape(-1, x.shape[-1])
            flat_y = y.view(-1, y.shape[-1])
            for slot, start, stop in self.runs:
                h = F.linear(flat_x[start:stop], a[slot])
                flat_y[start:stop].addmm_(h, b[slot].t(), alpha=self.scale[slot])
        return y


class BagLoraHooks:
    """``y[i] += scale[s_i] · B[s_i] (A[s_i] x_i)`` from the running adapters' gathered pairs.

    Both products are weighted sums of table rows, so each is one ``embedding_bag`` over
    :class:`GatheredPairs`' tables, one bag per token: the shrink sums row ``x_t[j]`` ·
    ``(scale·A)ᵀ[p·in + j]`` over the input dims j (position p = the token's adapter), the
    expand sums ``low_t[k]`` · ``Bᵀ[p·r + k]`` over its rank. Rows stay in batch order: no
    grouping by adapter, no padding, no gathered inputs or deltas; a token without an adapter
    reads the table's zero row. Targets sharing an input (q/k/v, gate/up: ``SHARED_INPUT``)
    share the shrink: the first of them to be called computes all their low-rank activations
    ``[tokens, R]`` and keeps them for the others, which only expand their rank range.

    Why bags, not batched matmuls over the rows grouped by adapter (``[U, m, in] @ [U, in, R]``,
    as before): the cost is streaming every running adapter's pairs from memory each step
    (U x 9.8 MB fp32 on SmolLM2, r=8 on its 7 targets), and MKL's batched matmuls of such
    shapes stream at a fraction of the memory's rate, slower still in bf16, while the bag
    kernel streams rows and sums them in fp32 in any dtype. So the tables are in the base's
    dtype: bf16 halves the bytes. The 210 sites of one SmolLM2 decode step of 32 rows on 32
    adapters, one thread of a 2-core avx512_bf16 EPYC (no AMX), kernels alone (scratch,
    medians of 9): grouped matmuls fp32 40.5 ms, bags fp32 30.1, bags bf16 23.6. A whole step
    + logits of 32 rows on 64 adapters, bf16, one process alternating both (17 rounds): bare
    76.9 ms, grouped matmuls 115.6, bags 100.5 (step ratio 0.665 -> 0.765; ``python -m
    bench.generate_engine --batch 32 --adapters 64`` gives a step's ratio). bf16 tables round
    each pair to bf16, as a bf16 base's own weights are (deltas within ~0.4% of fp32 ones).

    Why not gather A and B per row every step (:class:`core.inference.bank.MixedLoraHooks`'
    BGMV): 32 rows would copy 312 MB fp32 per decode step, on top of the bare step's weights.
    Here each adapter is copied once when it starts running: decoding copies no weights. The
    price: while adapters run, their pairs are held twice. A dense ``x [B, in] @ A_all [in,
    U·r]`` with a one-hot row mask was measured too: its multiply-adds grow with U·B (5 GFLOP
    per step at B=U=32, as much as the base's), slower.
    """

    def __init__(
        self, pairs: Mapping[GroupKey, SiteGroup], position: list[int], device: torch.device
    ) -> None:
        self.pairs = pairs
        self.position = position  # each row's buffer position; -1: no adapter
        self.device = device
        self._bags: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}
        # The last group's input and low-rank activations, for its other targets.
        self._low: tuple[Tensor, SiteGroup, Tensor] | None = None

    def weight(self, layer: int, target: str, weight: Tensor) -> Tensor:
        return weight

    def _bags_of(self, seq: int, width: int, zero: int) -> tuple[Tensor, Tensor]:
        """``(indices, offsets)`` of one bag per token: token t of row i sums table rows
        ``p_i·width .. p_i·width+width-1``; a token of a row without an adapter, row ``zero``
        ``width`` times."""
        key = (seq, width, zero)
        bags = self._bags.get(key)
        if bags is None:
            pos = torch.tensor(self.position, device=self.device).repeat_interleave(seq)
            index = (pos * width).unsqueeze(1) + torch.arange(width, device=self.device)
            index[pos < 0] = zero
            offsets = torch.arange(0, index.numel(), width, device=self.device)
            bags = self._bags[key] = (index.view(-1), offsets)
        return bags

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
            seq = x.shape[1]
            index, offsets = self._bags_of(seq, group.n_in, group.zero_row)
            low = _weighted_bags(group.a, index, offsets, x.reshape(-1))
            self._low = (x, group, low)  # [B·seq, R]
        start, stop, bt = part
        rank = stop - start
        # A bare token sums the zero row: its low row is 0, but 0 times another adapter's
        # overflowed pair is NaN.
        index, offsets = self._bags_of(x.shape[1], rank, bt.shape[0] - 1)
        weights = low[:, start:stop] if rank == low.shape[1] else low[:, start:stop].contiguous()
        delta = _weighted_bags(bt, index, offsets, weights.view(-1))
        y.view(delta.shape[0], -1).add_(delta)
        return y


def _weighted_bags(table: Tensor, index: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """``out[b] = Σ weights[i] · table[index[i]]`` over bag b's entries (``offsets``): the op
    ``F.embedding_bag(mode="sum")`` calls, without its per-call checks and offsets."""
    mode_sum = 0
    return torch.embedding_bag(table, index, offsets, False, mode_sum, False, weights)[0]
