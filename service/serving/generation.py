"""Generation serving: one scheduler owner thread per decoder base, and the async side of it.

:class:`GenerationServer` owns a :class:`core.generation.scheduler.Scheduler` on one thread
(docs/architecture.md invariant 3: the bank, the KV cache and the sequences have one owner).
Requests reach it through :meth:`GenerationServer.submit`, which queues the request (refused
at once when the queue is full: 503, or too long for the context: 400) and returns a
:class:`Generation`, the request's stream of per-step events, delivered onto the caller's
event loop. Tokenizing a prompt and reading an adapter's weights happen in worker threads
(:meth:`GenerationServer.encode_chat`, :meth:`GenerationServer.lora_weights`); detokenizing
happens on the owner thread, so the event loop only moves short strings.

The owner thread keeps its own copy of the tokenizer: a fast tokenizer is not safe to use
from two threads at once, and request threads share the other one under a lock.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from core.generation.detok import TokenBytes
from service.errors import ErrorKind, ServiceError, invalid, not_found, unavailable
from service.serving.queries import AdapterGone, AdapterKey

if TYPE_CHECKING:
    from core.adapter import Adapter
    from core.decoder.base import DecoderBase
    from core.generation.adapters import LoraWeights
    from core.generation.scheduler import GenerationRequest, Scheduler, SequenceEvent
    from service.config import Settings
    from service.serving.cores import CoreLender

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
# Adapters whose weights stay read (as LoRA pairs) between requests; the bank itself holds
# what running sequences use.
WEIGHTS_CACHE_ENTRIES = 64


class Generation:
    """One request's events, as the owner thread delivers them, until every candidate ends."""

    def __init__(self, server: GenerationServer, request_id: int, n: int, prompt_tokens: int):
        self.server = server
        self.request_id = request_id
        self.n = n
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0  # of the prompt, from the prefix cache: known with a first token
        self.queue: asyncio.Queue[list[SequenceEvent]] = asyncio.Queue()

    async def events(self) -> AsyncIterator[SequenceEvent]:
        """Every event of the request; a failed candidate raises a ServiceError (a 409 where
        the adapter's weights overflow, else a 500)."""
        open_candidates = self.n
        while open_candidates:
            for event in await self.queue.get():
                if event.error is not None:
                    raise _failed(event)
                if event.finish_reason is not None:
                    open_candidates -= 1
                self.cached_tokens = max(self.cached_tokens, event.cached_tokens)
                yield event

    def cancel(self) -> None:
        """Free the request's slots at the scheduler's next step (a client that left)."""
        self.server.cancel(self.request_id)


def _failed(event: SequenceEvent) -> ServiceError:
    from core.generation.scheduler import NON_FINITE_OUTPUT

    if event.error_code == NON_FINITE_OUTPUT:
        # The adapter's weights forbid the answer, not the request, as on /predict
        # (service.serving.run's non_finite_output); the server is not at fault.
        return ServiceError(
            f"{event.error}: train or import the adapter again with smaller weights",
            code=NON_FINITE_OUTPUT,
            param="model",
            kind=ErrorKind.CONFLICT,
        )
    return ServiceError(
        f"generation failed: {event.error}", code="generation_failed", kind=ErrorKind.INTERNAL
    )


class GenerationServer:
    """A decoder base's scheduler, its owner thread, and what requests need around it."""

    def __init__(
        self,
        base: DecoderBase,
        scheduler: Scheduler,
        load_adapter: Callable[[AdapterKey], Adapter],
        threads: int,
    ) -> None:
        self.base = base
        self.scheduler = scheduler
        self.load_adapter = load_adapter
        self.threads = threads  # torch threads of the owner thread (Settings.generation_threads)
        # Where the lifespan sets one, each step's threads instead: more while the embedded
        # worker idles (service.serving.cores).
        self.lender: CoreLender | None = None
        self.step_threads = threads  # the last step's
        # Request threads' tokenizer (one at a time); the owner thread has the scheduler's.
        self._tokenizer_lock = threading.Lock()
        self._max_token_chars = max_token_chars(base.tokenizer)
        self._token_bytes = TokenBytes(base.tokenizer)
        self._lock = threading.Lock()  # guards _sinks and _weights
        self._sinks: dict[int, tuple[asyncio.AbstractEventLoop, Generation]] = {}
        self._weights: OrderedDict[AdapterKey, LoraWeights] = OrderedDict()
        # Every key whose weights were handed out, by (tenant, name): the bank may still hold
        # one that _weights has dropped, and forget() must reach it too.
        self._issued: dict[tuple[str, str], set[AdapterKey]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._own, name=f"generation:{base.name}", daemon=True
        )

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def context_length(self) -> int:
        return self.scheduler.capacity

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)

    # --- request threads ------------------------------------------------------------------

    def encode_chat(
        self, messages: Sequence[Mapping[str, str]], param: str = "messages"
    ) -> list[int]:
        """The prompt ids of a conversation, rendered with the base's chat template; refused
        (400 naming ``param``) untokenized where its text cannot fit in the context."""
        if self.base.chat_template is None:
            raise ServiceError(
                f"{self.name} has no chat template; use /v1/completions with a prompt",
                code="no_chat_template",
                param="messages",
                kind=ErrorKind.UNSUPPORTED,
            )
        # The rendered prompt holds every message's content, so at least these characters.
        self._check_fits(sum(len(m["content"]) for m in messages), param)
        with self._tokenizer_lock:
            ids = self.base.tokenizer.apply_chat_template(
                list(messages),
                chat_template=self.base.chat_template,
                add_generation_prompt=True,
                tokenize=True,
            )
        return list(ids)

    def encode_text(self, text: str, param: str = "prompt") -> list[int]:
        """The ids of ``text``; refused (400 naming ``param``) untokenized where it cannot fit
        in the context."""
        self._check_fits(len(text), param)
        with self._tokenizer_lock:
            return list(self.base.tokenizer.encode(text))

    def _check_fits(self, chars: int, param: str) -> None:
        """Refuse a text of ``chars`` characters that is more tokens than the context holds
        (each token stands for at most ``_max_token_chars`` of them) before tokenizing it: a
        prompt may be 1 MiB, and tokenizing it whole holds the one tokenizer lock every
        request thread waits on (0.65 s for 1 MiB of SmolLM2 prompt, 2 shared cores). Where
        no such bound is known, the scheduler refuses it after tokenizing (:meth:`submit`)."""
        limit = self.context_length
        if self._max_token_chars is not None and chars > limit * self._max_token_chars:
            raise ServiceError(
                f"this model's maximum context length is {limit} tokens; the prompt's {chars} "
                f"characters are more tokens than that (a token is at most "
                f"{self._max_token_chars} characters)",
                code="context_length_exceeded",
                param=param,
                kind=ErrorKind.UNSUPPORTED,
            )

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        """Each token's own bytes (logprobs name tokens by them)."""
        with self._tokenizer_lock:
            return self._token_bytes(ids)

    def lora_weights(self, key: AdapterKey, param: str = "model") -> LoraWeights:
        """The LoRA pairs of the adapter ``key``, read from the database on a miss.

        Refused with a 4xx naming ``param`` (the request field that named the adapter): a
        deleted adapter (404), one that cannot generate (a reward or classifier head, a method
        other than LoRA) or that belongs to another base (400).
        """
        from core.errors import AdapterFormatError
        from core.generation.adapters import LoraWeights
        from core.heads import LANGUAGE_MODEL_TASKS

        with self._lock:
            cached = self._weights.get(key)
            if cached is not None:
                self._weights.move_to_end(key)
                return cached
        name = key[1]
        try:
            adapter = self.load_adapter(key)
        except AdapterGone:
            raise not_found(param, name, param) from None
        if adapter.task not in LANGUAGE_MODEL_TASKS:
            raise _cannot_generate(f"adapter {name!r} is a {adapter.task} adapter", param)
        if adapter.method.type != "lora":
            raise _cannot_generate(
                f"adapter {name!r} uses {adapter.method.type}; only LoRA adapters generate here",
                param,
            )
        try:
            method = adapter.load_method(self.base)
        except AdapterFormatError as exc:
            raise _cannot_generate(str(exc), param) from None
        pairs = {site: (a.detach(), b.detach()) for site, (a, b) in method.pairs().items()}
        weights = LoraWeights(key, pairs, float(method.config.scaling))
        with self._lock:
            self._weights[key] = weights
            self._issued.setdefault(key[:2], set()).add(key)
            while len(self._weights) > WEIGHTS_CACHE_ENTRIES:
                self._weights.popitem(last=False)
        return weights

    # --- the event loop -------------------------------------------------------------------

    def submit(self, request: GenerationRequest, prompt_param: str) -> Generation:
        """Queue ``request``; its events arrive on the calling event loop. ``prompt_param``
        names the request field a too-long prompt is reported on."""
        from core.errors import ConfigError
        from core.generation.scheduler import ContextLengthError, QueueFull

        loop = asyncio.get_running_loop()
        with self._lock:  # registered before the owner thread can answer it
            try:
                request_id = self.scheduler.add(request)
            except QueueFull:
                raise unavailable(
                    f"{self.scheduler.max_waiting} of your generation requests are already "
                    "waiting; retry shortly",
                    "generation_queue_full",
                    retry_after=RETRY_AFTER_S,
                ) from None
            except ContextLengthError as exc:
                raise ServiceError(
                    str(exc),
                    code="context_length_exceeded",
                    param=prompt_param,
                    kind=ErrorKind.UNSUPPORTED,
                ) from None
            except ConfigError as exc:
                raise invalid(exc.message, exc.field) from None
            generation = Generation(self, request_id, request.params.n, len(request.prompt_ids))
            self._sinks[request_id] = (loop, generation)
        return generation

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self._sinks.pop(request_id, None)
        self.scheduler.cancel(request_id)

    def forget(self, tenant_id: str, name: str) -> None:
        """An adapter was deleted or replaced: drop its weights and free its bank slot."""
        with self._lock:
            keys = self._issued.pop((tenant_id, name), set())
            for key in keys:
                self._weights.pop(key, None)
        for key in keys:
            self.scheduler.invalidate_adapter(key)

    # --- the owner thread -----------------------------------------------------------------

    def _own(self) -> None:
        from core.hardware import set_thread_torch_threads

        threads = self.threads
        set_thread_torch_threads(threads)
        while not self._stopping.is_set():
            if not self.scheduler.wait_for_work(timeout=0.5):
                continue
            if (lent := self._step_threads()) != threads:
                threads = lent
                set_thread_torch_threads(threads)
            self.step_threads = threads
            try:
                events = self.scheduler.step()
            except Exception:  # the scheduler fails sequences itself; this is a bug: keep going
                logger.exception("generation step failed on %s", self.name)
                continue
            self._deliver(events)

    def _step_threads(self) -> int:
        """The lender's count for the next step, or the budget (nothing may end this thread:
        a lender that fails is logged and the step runs on the budget)."""
        if self.lender is None:
            return self.threads
        try:
            return self.lender.threads()
        except Exception:
            logger.exception("asking for generation threads failed on %s", self.name)
            return self.threads

    def _deliver(self, events: list[SequenceEvent]) -> None:
        by_request: dict[int, list[SequenceEvent]] = {}
        for event in events:
            by_request.setdefault(event.request_id, []).append(event)
        with self._lock:
            for request_id, batch in by_request.items():
                sink = self._sinks.get(request_id)
                if sink is None:  # cancelled meanwhile: nobody reads it
                    continue
                loop, generation = sink
                try:
                    loop.call_soon_threadsafe(generation.queue.put_nowait, batch)
                except RuntimeError:  # the loop is closed (shutdown)
                    self._sinks.pop(request_id, None)


def max_token_chars(tokenizer: Any) -> int | None:
    """The most characters of input one token of ``tokenizer`` can stand for, or None where
    no bound holds.

    A byte-level BPE token's vocabulary string has one character per byte it stands for, and
    a byte is at most one character of input; an added token is matched literally. So its
    longest vocabulary entry bounds it, if nothing rewrites the input first (a normalizer may
    merge characters) and no unknown-token fuses a run of characters into one (never with
    byte-level pre-tokenization: every byte is in the vocabulary).
    """
    from tokenizers import normalizers, pre_tokenizers
    from tokenizers.models import BPE

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.model, BPE):
        return None
    normalizer = backend.normalizer
    if normalizer is not None and not (
        isinstance(normalizer, normalizers.Sequence) and len(normalizer) == 0
    ):
        return None
    byte_level = isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel)
    if backend.model.fuse_unk and not byte_level:
        return None
    return max(len(token) for token in tokenizer.get_vocab())


def _cannot_generate(message: str, param: str) -> ServiceError:
    return ServiceError(
        message, code="model_not_generative", param=param, kind=ErrorKind.UNSUPPORTED
    )


def start_generation(
    bases: Mapping[str, Any],
    decoder_names: Sequence[str],
    settings: Settings,
    load_adapter: Callable[[AdapterKey], Adapter],
    threads: int,
) -> dict[str, GenerationServer]:
    """A started :class:`GenerationServer` for each decoder base, by name, each computing on
    ``threads`` torch threads."""
    import torch

    from core.generation.kv import slots_for_budget
    from core.generation.scheduler import Scheduler
    from core.hardware import kv_dtype, resolve_dtype

    servers: dict[str, GenerationServer] = {}
    for name in decoder_names:
        base: DecoderBase = bases[name]
        capacity = min(settings.generation_context_tokens, base.max_length)
        # The base's own weights stay for training and scoring; bf16 adds a half-size copy.
        weights = base.weights.to(resolve_dtype(settings.generation_dtype, base.weights.device))
        cache_dtype = kv_dtype(weights.dtype, weights.device)
        slots = slots_for_budget(
            base.config, capacity, cache_dtype, settings.generation_kv_cache_mb << 20
        )
        if slots < 1:
            raise ValueError(
                f"generation_kv_cache_mb={settings.generation_kv_cache_mb} holds no sequence of "
                f"{capacity} tokens of {name}; raise it or lower generation_context_tokens"
            )
        reserved = settings.generation_reserved_slots
        if reserved is None:
            reserved = max(1, slots // 8) if slots > 1 else 0
        elif reserved >= slots:
            raise ValueError(
                f"generation_reserved_slots={reserved} leaves no slot of the {slots} that "
                f"generation_kv_cache_mb holds for {name}; lower it or raise the cache"
            )
        scheduler = Scheduler(
            weights,
            copy.deepcopy(base.tokenizer),
            num_slots=slots,
            capacity=capacity,
            stop_token_ids=base.stop_token_ids,
            max_waiting=settings.generation_max_waiting,
            reserved_slots=reserved,
            max_adapters=settings.generation_max_adapters,
            prefill_tokens_per_step=settings.generation_prefill_tokens,
            merged_bytes=settings.generation_merged_mb << 20,
            kv_dtype=cache_dtype,
            prefix_cache_bytes=settings.generation_prefix_cache_mb << 20,
        )
        server = GenerationServer(base, scheduler, load_adapter, threads)
        server.start()
        servers[name] = server
        logger.info(
            "generating with %s on %s (%d threads) in %s (KV cache in %s): %d sequences of "
            "%d tokens",
            name,
            torch.device(base.device),
            threads,
            weights.dtype,
            cache_dtype,
            slots,
            capacity,
        )
    return servers
