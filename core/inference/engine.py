"""Serve many adapters from one frozen base: plan a batch, run its forwards, release it.

Ownership and threads. An :class:`InferenceEngine` is owned by ONE thread (the service's
batcher thread): the bank's stacked tensors, the LRU and the merged-weight cache are mutated by
``load``/``unload``/``plan``/``release`` without locks, because a single owner needs none
(docs/architecture.md invariant 3); the tokenizer, which is not thread-safe either, runs there
too. Which adapters are resident, and the pins below, are kept by the ledger in
:mod:`core.inference.residency`; this module groups rows into forwards and runs them.
The forward passes, the bulk of the time, can run elsewhere: ``plan`` turns rows into a
:class:`Plan` (adapters resident, rows tokenized, each group's hooks built from the bank as it
is then), and ``execute(plan)`` may run on any thread, several plans at once, because it only
reads the plan and tensors nobody writes while it runs. Every adapter a plan uses stays
*pinned* until the owner calls ``release(plan)``: the LRU never evicts it, and an ``unload`` or
a replacement takes it out of service at once but frees its bank slot only after the release.
``run`` is plan + execute + release on the calling thread.

Torch threads. The library never calls ``torch.set_num_threads`` or sets ``OMP_*``: those are
process-wide and belong to whoever owns the process (the service at startup, or a benchmark).
On small shared machines set ``OMP_WAIT_POLICY=PASSIVE`` before torch is imported: spinning
OpenMP workers were measured to make 2 threads 2-30x slower when the cores are shared.

Precision and device. The engine serves on CUDA when available, else CPU, in ``dtype``. When the
device or dtype differs from the base's, it keeps a separate cast copy of the encoder; the base
itself is never modified (docs/architecture.md invariant 4). Classification/reward heads
always run in fp32.

Which path a row takes:

* ``key=None``: the bare base; the result carries the pooled ``features``.
* LoRA adapter, ``mode="unmerged"`` (default): all such rows, of any number of adapters, and the
  ``key=None`` rows run in ONE forward; the base matmuls run once for the whole batch and
  :class:`~core.inference.bank.MixedLoraHooks` adds each row's own LoRA delta.
* LoRA adapter, ``mode="merged"``: one forward per adapter with ``W + scale·B@A`` copies of only
  the targeted weights, kept in an LRU bounded by ``merged_cache_bytes``.
* Any other method (bottleneck, prompt tuning, feature extraction, full): one forward per
  distinct adapter through the model ``adapter.build(...)`` returned (``mode`` is ignored:
  there is nothing to merge).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from core.adapter import Adapter
from core.base import FrozenBase
from core.encoder import NO_HOOKS, BertEncoder, EncoderHooks
from core.errors import CoreError
from core.inference.bank import LoraBank, MixedLoraHooks
from core.inference.execute import Group, Plan, execute_plan
from core.inference.merged_cache import MergedCache
from core.inference.residency import Residency, Resident
from core.inference.rows import FORWARD_MODES, AdapterNotResidentError, Row, RowResult
from core.inference.tokens import Item, RowEncoder, Tokenized
from core.methods.lora.layer import merge_pairs
from core.model import pool_rows

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters for ``/metrics``, read on scrape. Hits and misses count rows planned against
    resident / missing adapters; ``resident_bytes`` includes retired entries still pinned."""

    hits: int
    misses: int
    loads: int
    evictions: int
    resident_bytes: int
    resident_count: int
    bank_bytes: int
    bank_capacity: int
    merged_cache_bytes: int
    merged_cache_count: int


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _normalize(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def serving_base(base: FrozenBase, device: torch.device, dtype: torch.dtype) -> FrozenBase:
    """``base`` itself if it already lives on ``device`` in ``dtype``, else a cast copy of it.

    The copy is built on the meta device first, so no random init is spent on it.
    """
    p = next(base.encoder.parameters())
    if _normalize(p.device) == _normalize(device) and p.dtype == dtype:
        return base
    with torch.device("meta"):
        enc = BertEncoder(base.config)
    enc = enc.to_empty(device=device).to(dtype)
    enc.load_state_dict(base.encoder.state_dict())
    enc.requires_grad_(False).eval()
    return dataclasses.replace(base, encoder=enc, device=device)


class InferenceEngine:
    """Resident adapters + mixed-batch inference on one frozen base. One owner thread only."""

    def __init__(
        self,
        base: FrozenBase,
        *,
        dtype: torch.dtype = torch.float32,
        max_resident_bytes: int = 1 << 30,
        merged_cache_bytes: int = 256 << 20,
        device: torch.device | str | None = None,
        on_evict: Callable[[Hashable], None] | None = None,
    ) -> None:
        self.base = base
        self.device = _normalize(torch.device(device) if device is not None else _default_device())
        self.dtype = dtype
        self._serving = serving_base(base, self.device, dtype)
        self._bank = LoraBank(base.config, device=self.device, dtype=dtype)
        self._encoder = RowEncoder(base)  # for rows given as text (the service encodes its own)
        self._merged = MergedCache(merged_cache_bytes)
        self._residency = Residency(
            base,
            self._serving,
            self._bank,
            self._merged,
            dtype=dtype,
            max_bytes=max_resident_bytes,
            on_evict=on_evict,
        )

    # --- residency (kept by the ledger; see core.inference.residency) ----------------------

    def __contains__(self, key: Hashable) -> bool:
        return key in self._residency

    def __len__(self) -> int:
        return len(self._residency)

    def resident_keys(self) -> list[Hashable]:
        """Resident keys, least recently used first."""
        return self._residency.keys()

    @property
    def max_resident_bytes(self) -> int:
        return self._residency.max_bytes

    @max_resident_bytes.setter
    def max_resident_bytes(self, value: int) -> None:
        # Takes effect at the next load; nothing is evicted just because the budget shrank.
        self._residency.max_bytes = value

    @property
    def bank(self) -> LoraBank:
        return self._bank

    def slot_of(self, key: Hashable) -> int | None:
        """Bank slot of a resident LoRA adapter (None: another method). KeyError if absent."""
        return self._residency[key].slot

    @property
    def stats(self) -> EngineStats:
        r = self._residency
        return EngineStats(
            hits=r.hits,
            misses=r.misses,
            loads=r.loads,
            evictions=r.evictions,
            resident_bytes=r.bytes,
            resident_count=len(r),
            bank_bytes=self._bank.num_bytes,
            bank_capacity=self._bank.capacity,
            merged_cache_bytes=self._merged.num_bytes,
            merged_cache_count=len(self._merged),
        )

    def load(
        self, key: Hashable, adapter: Adapter, *, keep: Collection[Hashable] = ()
    ) -> list[Hashable]:
        """Make ``adapter`` resident under ``key`` (replacing a previous one); return evictions.

        The adapter is validated and fully built before anything is published, so a failed
        load (:class:`~core.errors.AdapterFormatError`,
        :class:`~core.inference.residency.ResidencyError`) leaves the engine serving what it
        served before. Least recently used adapters not in ``keep`` are evicted until
        ``max_resident_bytes`` holds.
        """
        return self._residency.load(key, adapter, keep)

    def unload(self, key: Hashable) -> bool:
        """Drop an adapter (its bank slot is zeroed and reused). False if it was not resident.

        Plans made afterwards no longer see it; plans already made finish with it, and its
        slot is freed when the last of them is released.
        """
        return self._residency.unload(key)

    # --- inference ------------------------------------------------------------------------

    def run(
        self,
        rows: Sequence[Row],
        *,
        loader: Callable[[Hashable], Adapter] | None = None,
        with_features: bool = False,
    ) -> list[RowResult]:
        """Results for ``rows``, in order: :meth:`plan`, :meth:`execute`, :meth:`release`."""
        plan = self.plan(rows, loader=loader, with_features=with_features)
        try:
            return self.execute(plan)
        finally:
            self.release(plan)

    @torch.inference_mode()
    def plan(
        self,
        rows: Sequence[Row],
        *,
        loader: Callable[[Hashable], Adapter] | None = None,
        with_features: bool = False,
    ) -> Plan:
        """Make ``rows`` ready to compute (owner thread); their adapters stay pinned until
        :meth:`release`. A bad row gets ``RowResult(error=...)``; others run.

        ``loader(key)`` (optional) fetches adapters that are not resident; they are loaded
        without evicting adapters this batch or any unreleased plan uses. Without it, such
        rows get :class:`~core.inference.rows.AdapterNotResidentError`.
        """
        results: list[RowResult | None] = [None] * len(rows)
        entries = self._resolve(rows, loader, results)
        pinned = self._residency.pin(entries)
        try:
            live = [i for i in range(len(rows)) if results[i] is None]
            tokens = self._tokenize(rows, entries, live, results)
            groups = self._plan(rows, entries, results)
        except BaseException:
            self._residency.unpin(pinned)
            raise
        return Plan(rows, entries, results, tokens, groups, pinned, with_features)

    @torch.inference_mode()
    def execute(self, plan: Plan) -> list[RowResult]:
        """Run a plan's forward passes and heads: on any thread, several plans at once."""
        return execute_plan(plan, self._encode)

    def release(self, plan: Plan) -> None:
        """Unpin a plan's adapters (owner thread, once ``execute`` is done or abandoned)."""
        pinned, plan.pinned = plan.pinned, []
        self._residency.unpin(pinned)

    def _resolve(
        self,
        rows: Sequence[Row],
        loader: Callable[[Hashable], Adapter] | None,
        results: list[RowResult | None],
    ) -> list[Resident | None]:
        """Each row's resident entry, loading missing ones; failed rows get their result."""
        entries: list[Resident | None] = [None] * len(rows)
        batch_keys = {r.key for r in rows if r.key is not None}
        failed: dict[Hashable, Exception] = {}
        for i, row in enumerate(rows):
            if row.mode not in FORWARD_MODES:
                results[i] = RowResult(row.key, error=CoreError(f"unknown mode {row.mode!r}"))
                continue
            if row.key is None:
                continue
            entry = self._residency.lookup(row.key)
            if entry is not None:
                entries[i] = entry
                continue
            if row.key not in failed:
                if loader is None:
                    failed[row.key] = AdapterNotResidentError(row.key)
                else:
                    try:
                        self.load(row.key, loader(row.key), keep=batch_keys)
                    except Exception as exc:  # the row's own problem; the batch goes on
                        failed[row.key] = exc
            if row.key in failed:
                results[i] = RowResult(row.key, error=failed[row.key])
            else:
                entries[i] = self._residency[row.key]
        return entries

    def _plan(
        self, rows: Sequence[Row], entries: list[Resident | None], results: list[RowResult | None]
    ) -> list[Group]:
        """Split the live rows into forward passes and build what each runs with."""
        mixed: list[int] = []
        merged: dict[Hashable, list[int]] = {}
        models: dict[Hashable, list[int]] = {}
        for i, (row, e) in enumerate(zip(rows, entries, strict=True)):
            if results[i] is not None:
                continue
            if e is None or (e.model is None and row.mode == "unmerged"):
                mixed.append(i)
            elif e.model is None:
                merged.setdefault(row.key, []).append(i)
            else:
                models.setdefault(row.key, []).append(i)
        groups: list[Group] = []
        if mixed:
            slots = [_slot(entries[i]) for i in mixed]
            hooks: EncoderHooks = NO_HOOKS
            if any(s >= 0 for s in slots):
                hooks = MixedLoraHooks(self._bank, torch.tensor(slots, device=self.device))
            groups.append(Group("mixed", mixed, hooks))
        for key, idx in merged.items():
            try:
                groups.append(Group("merged", idx, self._merged_hooks(key, entries[idx[0]])))
            except Exception as exc:  # e.g. out of memory: only this adapter's rows fail
                log.exception("merging %r failed", key)
                for i in idx:
                    results[i] = RowResult(key, error=exc)
        for idx in models.values():
            groups.append(Group("model", idx, model=entries[idx[0]].model))  # type: ignore[union-attr]
        return groups

    def _merged_hooks(self, key: Hashable, entry: Resident | None) -> EncoderHooks:
        merged = self._merged.get(key)
        if merged is None:
            assert entry is not None and entry.slot is not None
            merged = merge_pairs(
                self.base.encoder,  # the caller's base: fp32 weights to sum from
                self._bank.slot_pairs(entry.slot),
                entry.scaling,
                device=self.device,
                dtype=self.dtype,
            )
            self._merged.put(key, merged)
        return merged

    def _tokenize(
        self,
        rows: Sequence[Row],
        entries: list[Resident | None],
        live: list[int],
        results: list[RowResult | None],
    ) -> Tokenized:
        """Each live row's ids: its own :class:`Encoded` if it came with one (checked against
        its adapter's window), else encoded here, one tokenizer call per window."""
        tokens = Tokenized(self.base.config.pad_token_id, self.device)
        # Rows to encode here, by (window, whether they are a reward model's responses, whether
        # their head pools over the response).
        texts: dict[tuple[int, bool, bool], list[int]] = {}
        for i in live:
            e = entries[i]
            # The adapter's trained length (HeadConfig.window): a row is encoded as in training.
            window = e.head.window(self.base.max_length - e.reserved) if e else self.base.max_length
            encoded = rows[i].encoded
            response_pooled = e is not None and e.head.pooling == "response"
            if encoded is None:
                reward = e is not None and e.head.task == "reward"
                texts.setdefault((window, reward, response_pooled), []).append(i)
            elif encoded.max_length != window:  # encoded for another adapter's window
                results[i] = RowResult(
                    rows[i].key,
                    error=CoreError(
                        f"row encoded for a window of {encoded.max_length} tokens; "
                        f"its adapter takes {window}"
                    ),
                )
            else:
                tokens.add([i], [encoded], response_pooled)
        for (window, reward, response_pooled), idx in texts.items():
            items: list[Item] = [(rows[i].text, rows[i].text_pair) for i in idx]
            encode = self._encoder.encode_responses if reward else self._encoder.encode
            tokens.add(idx, encode(items, window), response_pooled)
        return tokens

    def _encode(self, batch: dict[str, Tensor], hooks: EncoderHooks) -> Tensor:
        types = batch["token_type_ids"]
        hidden, mask = self._serving.encoder(
            batch["input_ids"], batch["attention_mask"], types, hooks=hooks
        )
        return pool_rows(hidden, mask, types, self.base.pooling, batch["response_rows"])


def _slot(entry: Resident | None) -> int:
    return -1 if entry is None or entry.slot is None else entry.slot
