"""Continuous batching (vLLM / TGI style): sequences join and leave between decode steps.

Each :meth:`Scheduler.step` frees the slots of cancelled sequences, admits waiting requests
into free slots (all of a step's admissions prefilled in one packed pass, bounded by a
prompt-token budget; a request's ``n`` candidates share its row by copying the prompt's
keys and values), runs ONE decode step for every sequence that was already running,
and retires the finished ones. A long generation only ever costs others one decode row, never
their turn.

Threads: :meth:`add`, :meth:`cancel` and :meth:`invalidate_adapter` may be called from any
thread (they only queue work under a lock); :meth:`step` and everything it touches (the cache,
the adapter bank, the sequences) belong to the one thread that calls it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from core.decoder.forward import DecoderWeights, logits
from core.errors import ConfigError, CoreError
from core.generation.adapters import AdapterFull, AdapterSlots, LoraWeights
from core.generation.decode import decode_step
from core.generation.detok import IncrementalDetokenizer, StopStrings
from core.generation.kv import SlotCache
from core.generation.prefill import prefill
from core.generation.sampling import SamplingParams, TokenLogprob, sample

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


class QueueFull(RuntimeError):  # noqa: N818 - a state the caller answers with 503
    """The waiting queue is at its bound; the caller should retry later."""


class ContextLengthError(CoreError):
    """The prompt plus ``max_tokens`` does not fit in the context a slot holds."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: LoraWeights | None = None  # None: the bare base


@dataclass
class SequenceEvent:
    """What one candidate produced in one step (at most one token) and whether it ended.

    ``text`` is only complete characters, with nothing of a stop string; it may be empty while
    a multi-byte character or a possible stop string is held back.
    """

    request_id: int
    index: int  # the candidate, 0 .. n-1
    token_ids: list[int] = field(default_factory=list)  # the stop token id is not included
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0  # so far, counting a stop token
    error: str | None = None  # the request failed (its other candidates fail alike)


@dataclass
class _Sequence:
    request_id: int
    index: int
    params: SamplingParams
    slot: int
    adapter_key: Hashable | None
    adapter_slot: int  # bank slot, -1 for the bare base
    generator: torch.Generator
    detok: IncrementalDetokenizer
    stops: StopStrings
    length: int  # tokens whose keys and values are in the slot
    pending: int = -1  # the newest token: sampled, not yet in the cache
    completion_tokens: int = 0


class Scheduler:
    """Slots x capacity of KV cache, a bank of adapters, and the sequences using them."""

    def __init__(
        self,
        weights: DecoderWeights,
        tokenizer: Any,
        *,
        num_slots: int,
        capacity: int,
        stop_token_ids: tuple[int, ...] = (),
        max_waiting: int = 64,
        max_adapters: int = 64,
        prefill_tokens_per_step: int = 2048,
    ) -> None:
        self.weights = weights
        self.tokenizer = tokenizer
        capacity = min(capacity, weights.config.max_position_embeddings)
        self.cache = SlotCache(weights, num_slots, capacity)
        self.adapters = AdapterSlots(weights, max_adapters)
        self.stop_token_ids = frozenset(stop_token_ids)
        self.max_waiting = max_waiting
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self._free = list(range(num_slots))  # a heap: lowest slot first keeps batches contiguous
        self._running: dict[int, _Sequence] = {}  # by slot
        self._ids = itertools.count()
        self.prefill_tokens = 0  # prompt tokens run through prefill so far (n candidates: once)
        self.cancelled_sequences = 0  # running sequences stopped by cancel() so far
        self.generated_tokens = 0  # sampled so far, stop tokens included
        # Shared with other threads, under the lock:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: deque[tuple[int, GenerationRequest]] = deque()
        self._cancelled: set[int] = set()
        self._invalidated: list[Hashable] = []

    # --- any thread -----------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Tokens one sequence may hold: prompt plus generated."""
        return self.cache.capacity

    def add(self, request: GenerationRequest) -> int:
        """Queue a request and return its id; raises at once what can never run."""
        prompt, params = request.prompt_ids, request.params
        if not prompt:
            raise ConfigError("prompt", "needs at least one token")
        vocab = self.weights.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ConfigError("prompt", f"token ids must be in [0, {vocab})")
        if params.n > self.cache.slots:
            raise ConfigError("n", f"at most {self.cache.slots} candidates on this server")
        if len(prompt) + params.max_tokens > self.capacity:
            raise ContextLengthError(
                f"this model's maximum context length is {self.capacity} tokens; the prompt "
                f"has {len(prompt)} and max_tokens asks for {params.max_tokens} more"
            )
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting")
            request_id = next(self._ids)
            self._waiting.append((request_id, request))
            self._wake.set()
        return request_id

    def cancel(self, request_id: int) -> None:
        """Stop a request's candidates; their slots are free after the next step."""
        with self._lock:
            self._cancelled.add(request_id)
            self._wake.set()

    def invalidate_adapter(self, key: Hashable) -> None:
        """The adapter ``key`` was deleted or replaced: never load those weights again."""
        with self._lock:
            self._invalidated.append(key)
            self._wake.set()

    def wait_for_work(self, timeout: float) -> bool:
        """Block until there is something to step (or ``timeout`` seconds); True if there is."""
        with self._lock:
            if self._waiting or self._running or self._cancelled or self._invalidated:
                return True
            self._wake.clear()  # under the lock: an add() after this sets it again
        return self._wake.wait(timeout)

    # --- the owner thread -----------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @torch.inference_mode()
    def step(self) -> list[SequenceEvent]:
        """Cancel, admit (prefill), decode one token for the others, retire; the events."""
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            invalidated, self._invalidated = self._invalidated, []
            if cancelled:
                self._waiting = deque(w for w in self._waiting if w[0] not in cancelled)
        for seq in [s for s in self._running.values() if s.request_id in cancelled]:
            self._retire(seq)
            self.cancelled_sequences += 1
        for key in invalidated:
            self.adapters.invalidate(key)
        events: list[SequenceEvent] = []
        earlier = sorted(self._running.values(), key=lambda s: s.slot)
        self._admit(events)
        if earlier:
            self._decode(earlier, events)
        return events

    def _admit(self, events: list[SequenceEvent]) -> None:
        """Take waiting requests (in order) while slots, adapters and the step's prefill budget
        last, and prefill them all in one forward pass."""
        admitted: list[tuple[int, GenerationRequest, int]] = []
        budget = self.prefill_tokens_per_step
        slots_left = len(self._free)
        while True:
            with self._lock:
                if not self._waiting:
                    break
                request_id, request = self._waiting[0]
            n = request.params.n
            # One request per step at least, however long; more while the token budget lasts.
            if slots_left < n or (admitted and len(request.prompt_ids) > budget):
                break
            try:
                adapter_slot = self._pin_adapter(request, n)
            except AdapterFull:
                break  # waits (in order) until a running sequence releases its adapter
            except Exception as exc:  # a bad adapter fails its own request only
                log.exception("request %d: adapter could not be loaded", request_id)
                self._pop_waiting()
                events.extend(SequenceEvent(request_id, j, error=str(exc)) for j in range(n))
                continue
            self._pop_waiting()
            admitted.append((request_id, request, adapter_slot))
            budget -= len(request.prompt_ids)
            slots_left -= n
        if admitted:
            self._prefill(admitted, events)

    def _pop_waiting(self) -> None:
        with self._lock:
            self._waiting.popleft()

    def _pin_adapter(self, request: GenerationRequest, n: int) -> int:
        if request.adapter is None:
            return -1
        slot = self.adapters.acquire(request.adapter)
        for _ in range(n - 1):  # one pin per candidate: each releases its own
            self.adapters.acquire(request.adapter)
        return slot

    def _prefill(
        self, admitted: list[tuple[int, GenerationRequest, int]], events: list[SequenceEvent]
    ) -> None:
        """One packed pass over the admitted prompts (:func:`core.generation.prefill.prefill`);
        a request's ``n`` candidates share its prompt's keys and values, computed once."""
        device = self.weights.device
        rows: list[list[_Sequence]] = []
        for request_id, request, adapter_slot in admitted:
            params, prompt = request.params, request.prompt_ids
            key = request.adapter.key if request.adapter is not None else None
            seqs = [
                _Sequence(
                    request_id=request_id,
                    index=j,
                    params=params,
                    slot=heapq.heappop(self._free),
                    adapter_key=key,
                    adapter_slot=adapter_slot,
                    generator=params.generator(j, device),
                    detok=IncrementalDetokenizer(self.tokenizer),
                    stops=StopStrings(params.stop),
                    length=len(prompt),
                )
                for j in range(params.n)
            ]
            for seq in seqs:
                self._running[seq.slot] = seq
            rows.append(seqs)
        prompts = [request.prompt_ids for _, request, _ in admitted]
        flat = [s for seqs in rows for s in seqs]
        try:
            # Each prompt's packed rows, with its adapter.
            starts = itertools.accumulate((len(p) for p in prompts), initial=0)
            segments = [
                (slot, start, start + len(p))
                for (_, _, slot), p, start in zip(admitted, prompts, starts, strict=False)
            ]
            hooks = self.adapters.segment_hooks(segments)
            slots = [[s.slot for s in seqs] for seqs in rows]
            last = prefill(self.weights, self.cache, prompts, slots, hooks)
            self.prefill_tokens += sum(len(p) for p in prompts)
            repeats = torch.tensor([len(seqs) for seqs in rows], device=device)
            tokens, lps = sample(
                logits(self.weights, last).repeat_interleave(repeats, dim=0),
                [s.params for s in flat],
                [s.generator for s in flat],
            )
        except Exception as exc:
            log.exception("prefill of %d requests failed", len(admitted))
            for seqs in rows:
                for seq in seqs:
                    self._retire(seq)
                    events.append(SequenceEvent(seq.request_id, seq.index, error=str(exc)))
            return
        for seq, token, lp in zip(flat, tokens, lps, strict=True):
            events.append(self._accept(seq, token, lp))

    def _decode(self, seqs: list[_Sequence], events: list[SequenceEvent]) -> None:
        device = self.weights.device
        slots = torch.tensor([s.slot for s in seqs], device=device)
        tokens = torch.tensor([s.pending for s in seqs], device=device)
        lengths = torch.tensor([s.length for s in seqs], device=device)
        hooks = self.adapters.hooks(torch.tensor([s.adapter_slot for s in seqs], device=device))
        try:
            hidden = decode_step(self.weights, self.cache, slots, tokens, lengths, hooks)
            new, lps = sample(
                logits(self.weights, hidden), [s.params for s in seqs], [s.generator for s in seqs]
            )
        except Exception as exc:  # nothing of this step is usable: fail its sequences
            log.exception("decode step failed for %d sequences", len(seqs))
            for seq in seqs:
                self._retire(seq)
                events.append(SequenceEvent(seq.request_id, seq.index, error=str(exc)))
            return
        for seq, token, lp in zip(seqs, new, lps, strict=True):
            seq.length += 1
            events.append(self._accept(seq, token, lp))

    def _accept(self, seq: _Sequence, token: int, lp: TokenLogprob | None) -> SequenceEvent:
        """Record a sampled token and decide whether the sequence ends with it."""
        seq.completion_tokens += 1
        self.generated_tokens += 1
        event = SequenceEvent(seq.request_id, seq.index)
        if token in self.stop_token_ids:
            event.text, event.finish_reason = seq.stops.flush(), "stop"
        else:
            seq.pending = token
            event.token_ids.append(token)
            if lp is not None:
                event.logprobs.append(lp)
            event.text, stopped = seq.stops.feed(seq.detok.push(token))
            if stopped:
                event.finish_reason = "stop"
            elif seq.completion_tokens >= seq.params.max_tokens or seq.length >= self.capacity:
                event.text += seq.stops.flush()
                event.finish_reason = "length"
        event.completion_tokens = seq.completion_tokens
        if event.finish_reason is not None:
            self._retire(seq)
        return event

    def _retire(self, seq: _Sequence) -> None:
        del self._running[seq.slot]
        heapq.heappush(self._free, seq.slot)
        if seq.adapter_slot >= 0:
            self.adapters.release(seq.adapter_slot, seq.adapter_key)
