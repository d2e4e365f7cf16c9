"""Serve many adapters from one frozen base: residency (LRU by bytes) and mixed-batch forwards.

Ownership and threads. An :class:`InferenceEngine` is owned by ONE thread (the service's
batcher thread): the bank's stacked tensors, the LRU and the merged-weight cache are mutated by
``load``/``unload``/``plan``/``release`` without locks, because a single owner needs none
(ARCHITECTURE.md invariant 3); the tokenizer, which is not thread-safe either, runs there too.
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
itself is never modified (invariant 4). Classification/reward heads always run in fp32.

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
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from core.adapter import Adapter
from core.base import BaseModel
from core.encoder import NO_HOOKS, BertEncoder, EncoderHooks, pool
from core.errors import CoreError
from core.heads import HeadConfig
from core.inference.bank import LoraBank, MixedLoraHooks
from core.inference.merged_cache import MergedCache, merge_pairs
from core.inference.tokens import Tokenized
from core.model import AdaptedModel

log = logging.getLogger(__name__)

Mode = Literal["unmerged", "merged"]
_MODES = ("unmerged", "merged")


@dataclass(frozen=True)
class Row:
    """One input. ``key`` names a resident adapter (any hashable), or None for the bare base."""

    key: Hashable | None
    text: str
    text_pair: str | None = None
    mode: Mode = "unmerged"


@dataclass
class RowResult:
    """The answer for one row: the outputs of its task, or ``error`` (then nothing else).

    Classification: ``logits``, ``probabilities`` (softmax, keyed by label name) and ``label``
    (the argmax). Reward: ``reward``. Bare base (``key=None``): ``features`` (the pooled
    embedding); adapter rows carry ``features`` too when ``run(..., with_features=True)``.
    """

    key: Hashable | None
    task: str | None = None
    logits: list[float] | None = None
    probabilities: dict[str, float] | None = None
    label: str | None = None
    reward: float | None = None
    features: list[float] | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class AdapterNotResidentError(KeyError):
    """The row's adapter is not loaded (never loaded, unloaded or evicted) and no loader ran."""


class ResidencyError(CoreError):
    """An adapter cannot be made resident within ``max_resident_bytes``."""


@dataclass
class EngineStats:
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


@dataclass
class _Resident:
    head: HeadConfig
    nbytes: int
    reserved: int  # positions before the real tokens (prompt tuning)
    # LoRA: a bank slot + the head's weights.
    slot: int | None = None
    scaling: float = 0.0
    head_weight: Tensor | None = None
    head_bias: Tensor | None = None
    # Other methods: the built model (method + head on the serving base).
    model: AdaptedModel | None = None
    # Plans not yet released that use this entry; while > 0 its slot is never freed or reused.
    pins: int = 0
    # Unloaded, evicted or replaced while pinned: released when the last pin goes.
    retired: bool = False


@dataclass
class _Group:
    """Rows that share one forward pass, and what that pass runs with (built by ``plan``)."""

    kind: Literal["mixed", "merged", "model"]
    idx: list[int]
    hooks: EncoderHooks = NO_HOOKS
    model: AdaptedModel | None = None


@dataclass
class Plan:
    """A batch made ready by the owner thread; :meth:`InferenceEngine.execute` runs it anywhere.

    ``results`` already holds the rows that failed while planning (unknown mode, an adapter
    that could not be loaded); ``execute`` fills in the rest.
    """

    rows: Sequence[Row]
    entries: list[_Resident | None]
    results: list[RowResult | None]
    tokens: Tokenized
    groups: list[_Group]
    pinned: list[_Resident]
    with_features: bool


def _tensor_bytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _normalize(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def serving_base(base: BaseModel, device: torch.device, dtype: torch.dtype) -> BaseModel:
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
        base: BaseModel,
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
        self.max_resident_bytes = max_resident_bytes
        self.on_evict = on_evict
        self._serving = serving_base(base, self.device, dtype)
        self._bank = LoraBank(base.config, device=self.device, dtype=dtype)
        self._merged = MergedCache(merged_cache_bytes)
        self._residents: OrderedDict[Hashable, _Resident] = OrderedDict()  # LRU first
        self._resident_bytes = 0
        self._hits = self._misses = self._loads = self._evictions = 0

    # --- residency ------------------------------------------------------------------------

    def __contains__(self, key: Hashable) -> bool:
        return key in self._residents

    def __len__(self) -> int:
        return len(self._residents)

    def resident_keys(self) -> list[Hashable]:
        """Resident keys, least recently used first."""
        return list(self._residents)

    @property
    def bank(self) -> LoraBank:
        return self._bank

    def slot_of(self, key: Hashable) -> int | None:
        """Bank slot of a resident LoRA adapter (None: another method). KeyError if absent."""
        return self._residents[key].slot

    @property
    def stats(self) -> EngineStats:
        return EngineStats(
            hits=self._hits,
            misses=self._misses,
            loads=self._loads,
            evictions=self._evictions,
            resident_bytes=self._resident_bytes,
            resident_count=len(self._residents),
            bank_bytes=self._bank.num_bytes,
            bank_capacity=self._bank.capacity,
            merged_cache_bytes=self._merged.num_bytes,
            merged_cache_count=len(self._merged),
        )

    # load/unload run in inference mode: the bank's storage is created (or grown) inside
    # run(), so it holds inference tensors, which torch refuses to write to outside the mode.
    @torch.inference_mode()
    def load(
        self, key: Hashable, adapter: Adapter, *, keep: Collection[Hashable] = ()
    ) -> list[Hashable]:
        """Make ``adapter`` resident under ``key`` (replacing a previous one); return evictions.

        The adapter is validated and fully built before anything is published, so a failed
        load (:class:`~core.errors.AdapterFormatError`, :class:`ResidencyError`) leaves the
        engine serving what it served before. Least recently used adapters not in ``keep`` are
        evicted until ``max_resident_bytes`` holds.
        """
        adapter.check_base(self.base)
        entry, pairs = self._prepare(adapter)
        evicted = self._make_room(key, entry.nbytes, keep)
        if pairs is not None:
            entry.slot = self._bank.add(pairs, entry.scaling)
        old = self._residents.pop(key, None)
        self._residents[key] = entry  # published: visible to the next plan()
        self._resident_bytes += entry.nbytes
        if old is not None:
            self._retire(key, old)
        self._loads += 1
        return evicted

    @torch.inference_mode()
    def unload(self, key: Hashable) -> bool:
        """Drop an adapter (its bank slot is zeroed and reused). False if it was not resident.

        Plans made afterwards no longer see it; plans already made finish with it, and its
        slot is freed when the last of them is released.
        """
        entry = self._residents.pop(key, None)
        if entry is None:
            return False
        self._retire(key, entry)
        return True

    def _prepare(
        self, adapter: Adapter
    ) -> tuple[_Resident, dict[tuple[int, str], tuple[Tensor, Tensor]] | None]:
        # Building through Adapter.build reuses its validation (state keys, shapes, base).
        model = adapter.build(self._serving)
        reserved = int(getattr(adapter.method, "reserved_positions", 0))
        if adapter.method.type == "lora":
            pairs = {s: (a.detach(), b.detach()) for s, (a, b) in model.method.pairs().items()}
            w = model.head.out.weight.detach().float()
            b = model.head.out.bias.detach().float()
            elem = torch.empty((), dtype=self.dtype).element_size()
            nbytes = sum(a.numel() + b_.numel() for a, b_ in pairs.values()) * elem
            entry = _Resident(
                head=adapter.head,
                nbytes=nbytes + _tensor_bytes([w, b]),
                reserved=reserved,
                scaling=float(model.method.config.scaling),
                head_weight=w,
                head_bias=b,
            )
            return entry, pairs
        model.to(self.dtype)
        nbytes = _tensor_bytes([*model.parameters(), *model.buffers()])
        return _Resident(head=adapter.head, nbytes=nbytes, reserved=reserved, model=model), None

    def _make_room(self, key: Hashable, nbytes: int, keep: Collection[Hashable]) -> list[Hashable]:
        budget = self.max_resident_bytes
        if nbytes > budget:
            raise ResidencyError(f"adapter needs {nbytes} bytes; the budget is {budget}")
        # Retired entries still pinned by an unreleased plan count until they are released.
        total = self._resident_bytes
        old = self._residents.get(key)
        if old is not None and not old.pins:
            total -= old.nbytes  # replaced once the new version is in
        victims: list[Hashable] = []
        for k, e in self._residents.items():  # least recently used first
            if total + nbytes <= budget:
                break
            if k == key or k in keep or e.pins:
                continue
            victims.append(k)
            total -= e.nbytes
        if total + nbytes > budget:
            raise ResidencyError(
                f"adapter needs {nbytes} bytes; only {budget - total} can be freed "
                "without evicting adapters that batches in flight use"
            )
        for k in victims:
            self._retire(k, self._residents.pop(k))
            self._evictions += 1
            if self.on_evict is not None:
                self.on_evict(k)
        return victims

    def _retire(self, key: Hashable, entry: _Resident) -> None:
        """Take an entry out of service (already out of ``_residents``); free it when unpinned."""
        self._merged.drop(key)
        if entry.pins:
            entry.retired = True
        else:
            self._release(entry)

    def _release(self, entry: _Resident) -> None:
        self._resident_bytes -= entry.nbytes
        if entry.slot is not None:
            self._bank.remove(entry.slot)

    def _unpin(self, pinned: list[_Resident]) -> None:
        for entry in pinned:
            entry.pins -= 1
            if not entry.pins and entry.retired:
                self._release(entry)

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
        rows get :class:`AdapterNotResidentError`.
        """
        results: list[RowResult | None] = [None] * len(rows)
        entries, pinned = self._resolve(rows, loader, results)
        try:
            live = [i for i in range(len(rows)) if results[i] is None]
            tokens = self._tokenize(rows, entries, live)
            groups = self._plan(rows, entries, results)
        except BaseException:
            self._unpin(pinned)
            raise
        return Plan(rows, entries, results, tokens, groups, pinned, with_features)

    @torch.inference_mode()
    def execute(self, plan: Plan) -> list[RowResult]:
        """Run a plan's forward passes and heads: on any thread, several plans at once."""
        for group in plan.groups:
            self._compute(group, plan)
        assert all(r is not None for r in plan.results)
        return plan.results  # type: ignore[return-value]

    @torch.inference_mode()  # frees bank slots: inference tensors, written only in the mode
    def release(self, plan: Plan) -> None:
        """Unpin a plan's adapters (owner thread, once ``execute`` is done or abandoned)."""
        pinned, plan.pinned = plan.pinned, []
        self._unpin(pinned)

    def _resolve(
        self,
        rows: Sequence[Row],
        loader: Callable[[Hashable], Adapter] | None,
        results: list[RowResult | None],
    ) -> tuple[list[_Resident | None], list[_Resident]]:
        """Each row's resident entry (loading missing ones), and the entries now pinned."""
        entries: list[_Resident | None] = [None] * len(rows)
        batch_keys = {r.key for r in rows if r.key is not None}
        failed: dict[Hashable, Exception] = {}
        for i, row in enumerate(rows):
            if row.mode not in _MODES:
                results[i] = RowResult(row.key, error=CoreError(f"unknown mode {row.mode!r}"))
                continue
            if row.key is None:
                continue
            entry = self._residents.get(row.key)
            if entry is not None:
                self._hits += 1
                self._residents.move_to_end(row.key)
                entries[i] = entry
                continue
            self._misses += 1
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
                entries[i] = self._residents[row.key]
        pinned = list({id(e): e for e in entries if e is not None}.values())
        for entry in pinned:
            entry.pins += 1
        return entries, pinned

    def _plan(
        self, rows: Sequence[Row], entries: list[_Resident | None], results: list[RowResult | None]
    ) -> list[_Group]:
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
        groups: list[_Group] = []
        if mixed:
            slots = [_slot(entries[i]) for i in mixed]
            hooks: EncoderHooks = NO_HOOKS
            if any(s >= 0 for s in slots):
                hooks = MixedLoraHooks(self._bank, torch.tensor(slots, device=self.device))
            groups.append(_Group("mixed", mixed, hooks))
        for key, idx in merged.items():
            try:
                groups.append(_Group("merged", idx, self._merged_hooks(key, entries[idx[0]])))
            except Exception as exc:  # e.g. out of memory: only this adapter's rows fail
                log.exception("merging %r failed", key)
                for i in idx:
                    results[i] = RowResult(key, error=exc)
        for idx in models.values():
            groups.append(_Group("model", idx, model=entries[idx[0]].model))  # type: ignore[union-attr]
        return groups

    def _merged_hooks(self, key: Hashable, entry: _Resident | None) -> EncoderHooks:
        merged = self._merged.get(key)
        if merged is None:
            assert entry is not None and entry.slot is not None
            merged = merge_pairs(
                self.base,
                self._bank.slot_pairs(entry.slot),
                entry.scaling,
                device=self.device,
                dtype=self.dtype,
            )
            self._merged.put(key, merged)
        return merged

    def _tokenize(
        self, rows: Sequence[Row], entries: list[_Resident | None], live: list[int]
    ) -> Tokenized:
        tokens = Tokenized(self.base, self.device)
        groups: dict[tuple[bool, int], list[int]] = {}
        for i in live:
            e = entries[i]
            groups.setdefault((rows[i].text_pair is not None, e.reserved if e else 0), []).append(i)
        for (is_pair, reserved), idx in groups.items():
            pairs = [rows[i].text_pair or "" for i in idx] if is_pair else None
            tokens.add_group(
                idx, [rows[i].text for i in idx], pairs, self.base.max_length - reserved
            )
        return tokens

    def _encode(self, batch: dict[str, Tensor], hooks: EncoderHooks) -> Tensor:
        hidden, mask = self._serving.encoder(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], hooks=hooks
        )
        return pool(hidden, mask, self.base.pooling)

    def _compute(self, group: _Group, plan: Plan) -> None:
        try:
            feats, logits = self._forward(group, plan.tokens)
            self._finish(plan, group.idx, feats, logits)
        except Exception as exc:  # one failing group must not fail the other rows
            log.exception("inference failed for %d rows (%s)", len(group.idx), group.kind)
            for i in group.idx:
                plan.results[i] = RowResult(plan.rows[i].key, error=exc)

    def _forward(self, group: _Group, tokens: Tokenized) -> tuple[Tensor, Tensor | None]:
        """Pooled features [n, hidden], plus logits [n, k] when a built model ran its head."""
        batch = tokens.batch(group.idx)
        if group.model is None:
            return self._encode(batch, group.hooks), None
        feats = group.model.features(batch)
        return feats, group.model.head(feats).reshape(len(group.idx), -1)

    def _finish(self, plan: Plan, idx: list[int], feats: Tensor, logits: Tensor | None) -> None:
        """Apply each row's own head (grouped by adapter; heads are tiny) and fill results."""
        rows, entries, results = plan.rows, plan.entries, plan.results
        with_features = plan.with_features
        feats = feats.float()
        by_key: dict[Hashable, list[int]] = {}
        for j, i in enumerate(idx):
            by_key.setdefault(rows[i].key, []).append(j)
        outs: list[Tensor] = []
        for key, js in by_key.items():
            if key is None:
                continue
            sel = torch.tensor(js, device=feats.device)
            if logits is not None:
                outs.append(logits.index_select(0, sel).float())
            else:
                e = entries[idx[js[0]]]
                assert e is not None and e.head_weight is not None
                outs.append(F.linear(feats.index_select(0, sel), e.head_weight, e.head_bias))
        # One device→host copy for the whole group (one sync on CUDA).
        flat = torch.cat([o.reshape(-1) for o in outs]).cpu() if outs else None
        need_feats = with_features or None in by_key
        feats_host = feats.cpu() if need_feats else None
        offset = 0
        k = 0
        for key, js in by_key.items():
            if key is None:
                assert feats_host is not None
                for j in js:
                    results[idx[j]] = RowResult(None, features=feats_host[j].tolist())
                continue
            head = entries[idx[js[0]]].head  # type: ignore[union-attr]
            width = outs[k].shape[1]
            k += 1
            assert flat is not None
            block = flat[offset : offset + len(js) * width].view(len(js), width)
            offset += len(js) * width
            for j, out in zip(js, block, strict=True):
                res = _head_result(key, head, out)
                if with_features:
                    assert feats_host is not None
                    res.features = feats_host[j].tolist()
                results[idx[j]] = res


def _slot(entry: _Resident | None) -> int:
    return -1 if entry is None or entry.slot is None else entry.slot


def _head_result(key: Hashable, head: HeadConfig, out: Tensor) -> RowResult:
    if head.task == "reward":
        return RowResult(key, task="reward", reward=float(out[0]))
    probs = torch.softmax(out, dim=0).tolist()
    best = int(torch.argmax(out))
    return RowResult(
        key,
        task="classification",
        logits=out.tolist(),
        probabilities=dict(zip(head.label_names, probs, strict=True)),
        label=head.label_names[best],
    )
