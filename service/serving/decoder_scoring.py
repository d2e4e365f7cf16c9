"""Reward models and classifiers on a decoder base, served: ``/predict`` and
``/reward/compare`` for an adapter whose head reads the last token, and best-of-n's scores.

One :class:`DecoderScorer` per decoder base (started by the serving hook, kept in
``AppState.decoder_scoring`` by base name). It is the encoder's serving path with the decoder's
parts swapped in, not a second copy of it:

- rows are encoded in the request's thread, in its tenant's turn
  (:class:`service.serving.run.TenantTurns`), on a tokenizer copy no other thread holds, by
  core's own encoding for these heads (:func:`core.decoder.scoring.encode_scored_turns`, what
  training used); ``max_request_chars`` (checked by the routes) and the adapter's window bound
  what a request costs;
- the rows queue in the same :class:`service.serving.batcher.Batcher` the encoder uses (its
  own instance): per-tenant queues served fewest-tokens-first, a tenant's share of the queue
  capped, cold adapters read once per key off the event loop, batches computed in its pool
  threads (never on the event loop), a departed client's rows dropped;
- :class:`DecoderHeadEngine` is the engine that batcher owns: resident adapter models
  (``Adapter.build_decoder_head`` on the shared frozen base) in an LRU charged by their own
  tensors' bytes (``adapter_cache_mb``), pinned while a batch uses them, and each batch's rows
  run adapter by adapter, in length order, ``SCORE_BATCH_SIZE`` to a forward. It refuses as
  core's residency does (:mod:`core.inference.residency`): a row whose room adapters in use
  hold is parked by the batcher (``ResidencyBusyError``), an adapter larger than the whole
  cache fails its rows (``AdapterTooLargeError``); a row whose output is inf or NaN fails with
  the encoder's ``NonFiniteOutputError``.

Deleting or replacing an adapter drops its resident versions (:meth:`DecoderScorer.invalidate`,
told by the delete as the encoder's batcher is); a new version has a new key
``(tenant_id, name, version)``, so old weights are never served for it.

In-process API (best-of-n, on the event loop)::

    scorer = state.decoder_scoring[base_name]          # or decoder_scorer_for(state, ref, param)
    rewards: list[float] = await scorer.score(adapter, prompt, responses)

``adapter`` is the caller's :class:`~service.serving.queries.AdapterRef` (from the request's
lookup, already the caller's tenant's) or its key ``(tenant_id, name, version)``; ``prompt``
(None: none) is the user turn each response answers. Rewards come back in ``responses``' order.
Refusals are ``ServiceError``: 404 for an adapter deleted meanwhile, 422 for one that is not a
reward model on this base, 409 for one larger than the adapter cache or whose weights overflow
on a response, 503 with a full queue. Responses
longer than the window are cut as in training (the response kept from its start).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.errors import ErrorKind, invalid, not_found
from service.serving.batcher import Batcher
from service.serving.queries import AdapterKey, AdapterRef, DatabaseLoader, find_adapter
from service.serving.run import RowError, TenantTurns, infer, tenant_of

if TYPE_CHECKING:
    from core.adapter import Adapter
    from core.decoder.base import DecoderBase
    from core.decoder.scoring import DecoderHeadModel
    from core.inference import Row, RowResult
    from service.bases import Bases
    from service.state import AppState

logger = logging.getLogger(__name__)

Item = tuple[str, str | None]  # (text, text_pair or None), as the encoder's routes give them
SCORED_TASKS = ("classification", "reward")


def prompt_and_response(item: Item, task: str) -> tuple[str | None, str, str]:
    """How an item is rendered, as training renders its rows (``encode_decoder_rows``):
    ``(prompt, response, the response's role)``. A pair is a user turn and the assistant's
    reply; a single text is the assistant's reply (reward) or a user message (classification)."""
    text, pair = item
    if pair is not None:
        return text, pair, "assistant"
    return None, text, "assistant" if task == "reward" else "user"


# --- the engine the batcher owns ----------------------------------------------------------------


@dataclass(eq=False)
class _Resident:
    model: DecoderHeadModel
    nbytes: int
    pins: int = 0
    retired: bool = False  # out of the ledger; its bytes are freed when the last pin goes


@dataclass
class _Plan:
    """A batch's rows grouped by adapter (row indices), the entries it pinned, and the rows
    that failed before computing (their adapter could not be made resident)."""

    rows: list[Row]
    groups: dict[Hashable, tuple[_Resident, list[int]]] = field(default_factory=dict)
    errors: dict[int, Exception] = field(default_factory=dict)


class DecoderHeadEngine:
    """Decoder head adapters resident on one frozen decoder base, for one owner thread.

    The interface the :class:`Batcher` drives (``plan``/``execute``/``release``, ``unload``,
    ``resident_keys``, ``key in engine``): ``plan`` and the ledger run on the batcher's owner
    thread only; ``execute`` on its compute threads reads nothing but the plan and the pinned
    models (docs/architecture.md invariant 3).
    """

    def __init__(self, base: DecoderBase, *, max_resident_bytes: int) -> None:
        self.base = base
        self.max_resident_bytes = max_resident_bytes
        self._ledger: OrderedDict[Hashable, _Resident] = OrderedDict()  # least recent first
        self.bytes = 0  # resident + retired-but-pinned models
        self.loads = self.evictions = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._ledger

    def resident_keys(self) -> list[Hashable]:
        """Resident keys, least recently used first."""
        return list(self._ledger)

    def unload(self, key: Hashable) -> bool:
        """Take ``key`` out of service now (its bytes freed once unpinned)."""
        entry = self._ledger.pop(key, None)
        if entry is None:
            return False
        self._retire(entry)
        return True

    def plan(self, rows: Sequence[Row], *, loader: Callable[[Hashable], Adapter]) -> _Plan:
        """Make each row's adapter resident (``loader`` on a miss) and pin it; a row whose
        adapter fails to load gets that error, the others run."""
        plan = _Plan(list(rows))
        failed: dict[Hashable, Exception] = {}
        for i, row in enumerate(rows):
            if row.key in failed:
                plan.errors[i] = failed[row.key]
                continue
            if row.key not in plan.groups:
                try:
                    entry = self._resident(row.key, loader, keep=plan.groups.keys())
                except Exception as exc:  # a deleted or unfit adapter fails its rows only
                    failed[row.key] = plan.errors[i] = exc
                    continue
                entry.pins += 1
                plan.groups[row.key] = (entry, [])
            plan.groups[row.key][1].append(i)
        return plan

    def execute(self, plan: _Plan) -> list[RowResult]:
        """Each row's result in the plan's row order (any compute thread)."""
        import torch

        from core.decoder.scoring import SCORE_BATCH_SIZE, right_pad
        from core.inference import RowResult
        from core.inference.execute import NonFiniteOutputError

        out: list[RowResult | None] = [None] * len(plan.rows)
        for i, exc in plan.errors.items():
            out[i] = RowResult(plan.rows[i].key, error=exc)
        for key, (entry, idx) in plan.groups.items():
            head = entry.model.head.config
            order = sorted(idx, key=lambda i: len(_ids(plan.rows[i])))
            for start in range(0, len(order), SCORE_BATCH_SIZE):
                chunk = order[start : start + SCORE_BATCH_SIZE]
                batch = right_pad([_ids(plan.rows[i]) for i in chunk], self.base.device)
                with torch.inference_mode():
                    scores = entry.model(batch).float().cpu()
                # One check per forward; rows are looked at one by one only when it fails.
                finite = bool(torch.isfinite(scores).all())
                for i, score in zip(chunk, scores, strict=True):
                    if not finite and not bool(torch.isfinite(score).all()):
                        error = NonFiniteOutputError(
                            f"the head's output is not finite: {score.tolist()}"
                        )
                        out[i] = RowResult(key, error=error)
                        continue
                    out[i] = _result(key, head.task, head.label_names, score)
        return [r for r in out if r is not None]

    def release(self, plan: _Plan) -> None:
        for entry, _ in plan.groups.values():
            entry.pins -= 1
            if not entry.pins and entry.retired:
                self.bytes -= entry.nbytes

    def _resident(
        self, key: Hashable, loader: Callable[[Hashable], Adapter], keep: Any
    ) -> _Resident:
        from core.inference.residency import choose_victims
        from core.tensors import tensor_bytes

        entry = self._ledger.get(key)
        if entry is not None:
            self._ledger.move_to_end(key)
            return entry
        adapter = loader(key)
        if adapter.head.base_kind != "decoder" or adapter.task not in SCORED_TASKS:
            raise ValueError(f"adapter {key!r} ({adapter.task}) has no last-token head")
        model = adapter.build_decoder_head(self.base)  # checks the base's fingerprint
        # Its own tensors (LoRA pairs, prompt tuning's tokens, full fine-tuning's weight copy,
        # the head); the frozen base is shared and not its.
        nbytes = tensor_bytes([*model.parameters(), *model.buffers()])
        evictable = (
            (k, e.nbytes)
            for k, e in self._ledger.items()  # least recently used first
            if k not in keep and not e.pins
        )
        for victim in choose_victims(evictable, self.bytes, nbytes, self.max_resident_bytes):
            self.unload(victim)
            self.evictions += 1
        entry = _Resident(model, nbytes)
        self._ledger[key] = entry
        self.bytes += nbytes
        self.loads += 1
        return entry

    def _retire(self, entry: _Resident) -> None:
        if entry.pins:
            entry.retired = True
        else:
            self.bytes -= entry.nbytes


def _ids(row: Row) -> list[int]:
    assert row.encoded is not None  # rows are encoded in the request's thread
    return row.encoded.input_ids


def _result(key: Hashable, task: str, labels: Sequence[str], score: Any) -> RowResult:
    import torch

    from core.inference import RowResult

    if task == "reward":
        return RowResult(key, task=task, reward=float(score))
    probs = torch.softmax(score, dim=0).tolist()
    best = int(torch.argmax(score))
    return RowResult(
        key,
        task=task,
        logits=score.tolist(),
        probabilities=dict(zip(labels, probs, strict=True)),
        label=labels[best],
    )


# --- the request's thread: items to rows --------------------------------------------------------


class DecoderRowEncoder:
    """A request's items to engine rows on the decoder's chat template, in the request's
    thread and its tenant's turn (the encoder's :class:`RequestTokenizer` for a decoder)."""

    def __init__(self, base: DecoderBase) -> None:
        from core.inference.tokens import TokenizerCopies

        self.base = base
        self._copies = TokenizerCopies(base.tokenizer)
        self._turns = TenantTurns()

    async def rows_in_turn(
        self, ref: AdapterRef, items: list[Item], truncate: bool, param: str
    ) -> list[Row]:
        return await self._turns.run(tenant_of(ref.key), self.rows, ref, items, truncate, param)

    def rows(self, ref: AdapterRef, items: list[Item], truncate: bool, param: str) -> list[Row]:
        """Rows for ``items``; with ``truncate=False``, a 422 for the first input longer than
        the adapter's window."""
        from core.decoder.scoring import encode_scored_turns
        from core.errors import DataError
        from core.inference import Encoded, Row

        window = ref.window(self.base.max_length)
        # Encoded a token past the window, a row that fills it was longer than the window;
        # the window's own ids are the same either way (the response is kept from its start).
        width = window if truncate else window + 1
        template = self.base.chat_template
        ids: list[list[int]] = []
        with self._copies.borrow() as tokenizer:
            for i, item in enumerate(items):
                prompt, response, role = prompt_and_response(item, ref.task)
                try:
                    (row,) = encode_scored_turns(
                        tokenizer, template, [prompt], [response], width, role=role
                    )
                except DataError as exc:
                    raise invalid(str(exc), f"{param}.{i}") from None
                if len(row) > window:
                    first_text = prompt is None
                    if not first_text:  # the prompt is at fault where the response alone fits
                        (alone,) = encode_scored_turns(
                            tokenizer, template, [None], [response], width, role=role
                        )
                        first_text = len(alone) <= window
                    raise RowError(
                        f"is longer than the {window} tokens the model takes (send "
                        "truncate=true to cut it)",
                        code="input_too_long",
                        kind=ErrorKind.INVALID,
                        param=param,
                        row=i,
                        first_text=first_text,
                    )
                ids.append(row)
        return [
            Row(ref.key, text, pair, encoded=Encoded(row, [], window))
            for (text, pair), row in zip(items, ids, strict=True)
        ]


# --- the scorer: one per decoder base -----------------------------------------------------------


class DecoderScorer:
    """Serves one decoder base's reward models and classifiers (module docstring)."""

    def __init__(
        self,
        base: DecoderBase,
        batcher: Batcher,
        encoder: DecoderRowEncoder,
        factory: sessionmaker[Session],
    ) -> None:
        self.base = base
        self.batcher = batcher
        self.encoder = encoder
        self.factory = factory  # reads an adapter's ref when score() is given its key

    @property
    def engine(self) -> DecoderHeadEngine:
        return self.batcher.engine  # type: ignore[return-value]

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    def invalidate(self, tenant_id: str, name: str) -> None:
        """Drop every resident version of an adapter (a delete or replace)."""
        self.batcher.invalidate(tenant_id, name)

    async def results(
        self, ref: AdapterRef, items: list[Item], truncate: bool, param: str
    ) -> list[RowResult]:
        """``/predict``'s and ``/reward/compare``'s results for ``items`` on ``ref``."""
        return await infer(self.encoder, self.batcher, ref, items, truncate, param, "unmerged")

    async def score(
        self, adapter: AdapterRef | AdapterKey, prompt: str | None, responses: Sequence[str]
    ) -> list[float]:
        """Each response's reward for ``prompt`` under the reward adapter ``adapter``
        (module docstring: the in-process API best-of-n calls)."""
        ref = adapter if isinstance(adapter, AdapterRef) else await self._ref(adapter)
        name = ref.key[1]
        if ref.task != "reward":
            raise invalid(
                f"adapter {name!r} is a {ref.task} adapter, not a reward model", "reward_adapter"
            )
        if ref.base_fingerprint != self.base.fingerprint:
            raise invalid(
                f"reward adapter {name!r} scores on {ref.base_model}, not on {self.base.name}",
                "reward_adapter",
                "base_model_mismatch",
            )
        items: list[Item] = [(prompt, r) if prompt is not None else (r, None) for r in responses]
        try:
            results = await self.results(ref, items, True, "reward_adapter")
        except RowError as e:  # a candidate the server generated, not a field of the request
            raise e.named(f"candidate {e.row}", "reward_adapter") from None
        return [float(r.reward) for r in results]  # type: ignore[arg-type]

    async def _ref(self, key: AdapterKey) -> AdapterRef:
        import anyio.to_thread

        tenant_id, name, _ = key
        factory = self.factory

        def look_up() -> AdapterRef | None:
            with factory() as session:
                return find_adapter(session.connection(), tenant_id, name)

        ref = await anyio.to_thread.run_sync(look_up)
        if ref is None or ref.key != key:
            raise not_found("adapter", name, "reward_adapter")
        return ref


def start_decoder_scoring(
    bases: Bases,
    names: Sequence[str],
    settings: Settings,
    loader: DatabaseLoader,
    threads: int,
) -> dict[str, DecoderScorer]:
    """A started :class:`DecoderScorer` for each decoder base in ``names``; ``loader`` reads
    an adapter on a cache miss, and its session factory serves the scorers' reads too."""
    from service.serving.lifespan import max_batch_tokens

    scorers: dict[str, DecoderScorer] = {}
    for name in names:
        base: DecoderBase = bases[name]  # type: ignore[assignment]
        engine = DecoderHeadEngine(base, max_resident_bytes=settings.adapter_cache_mb << 20)
        batcher = Batcher(
            engine,
            loader,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=max_batch_tokens(settings, base.device.type == "cuda"),
            max_wait_ms=settings.max_wait_ms,
            max_queue_rows=settings.max_queue_rows,
            threads=threads,
        )
        encoder = DecoderRowEncoder(base)
        scorer = DecoderScorer(base, batcher, encoder, loader.factory)
        scorer.start()
        scorers[name] = scorer
    return scorers


def decoder_scorer_for(state: AppState, ref: AdapterRef, param: str) -> DecoderScorer:
    """The scorer of the decoder ``ref`` was trained on: 422 ``base_model_mismatch`` if this
    deployment does not load that base, 422 ``adapter_task_mismatch`` for a chat or DPO
    adapter (which generates: /v1/chat/completions)."""
    from service.bases import adapter_base

    base = adapter_base(state.require_bases(), ref.base_model, ref.base_fingerprint, param)
    name = ref.key[1]
    if ref.task not in SCORED_TASKS:
        raise invalid(
            f"adapter {name!r} is a {ref.task} adapter of decoder {base.name!r}: it generates "
            "text (/v1/chat/completions); this route serves classifiers and reward models",
            param,
            "adapter_task_mismatch",
        )
    scorer = (state.decoder_scoring or {}).get(base.name)
    if scorer is None:  # test hooks that set a base alone
        raise invalid(f"decoder {base.name!r} is not served here", param, "base_model_mismatch")
    return scorer
