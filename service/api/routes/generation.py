"""``POST /v1/chat/completions`` and ``POST /v1/completions``: OpenAI's generation endpoints.

``model`` is a decoder base id or the name of one of the caller's chat or DPO adapters (LoRA);
another tenant's adapter is as unknown as a name nobody has (404). Every request is queued to
its base's scheduler (:mod:`service.serving.generation`), which batches it continuously with
every other sequence of that base, whatever adapter each uses. Prompts are tokenized in worker
threads; a client that disconnects frees its sequences at the scheduler's next step.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from core.generation.detok import token_text
from service.api.deps import LongRequestTenantId
from service.api.disconnect import unless_disconnected
from service.api.errors import error_body
from service.api.schemas.generation import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    SamplingFields,
    TokenLogprobOut,
    TopLogprob,
    Usage,
)
from service.bases import adapter_base
from service.errors import ErrorKind, ServiceError, invalid, not_found, unavailable
from service.serving.generation import Generation, GenerationServer
from service.serving.queries import AdapterKey, find_adapter
from service.state import AppState, app_state

if TYPE_CHECKING:
    from core.generation.adapters import LoraWeights
    from core.generation.sampling import SamplingParams, TokenLogprob
    from core.generation.scheduler import MergeMode, SequenceEvent
    from service.serving.decoder_scoring import DecoderScorer

router = APIRouter(tags=["generation"])

FinishReason = Literal["stop", "length"]


# --- which base and adapter a request's model names ------------------------------------------


@dataclass(frozen=True)
class _Target:
    server: GenerationServer
    adapter: LoraWeights | None


async def _target(request: Request, tenant_id: str, model: str) -> _Target:
    state = app_state(request)
    servers = state.generation
    if servers is None:
        raise unavailable(
            "The base models are still loading; retry shortly.", "model_not_ready", retry_after=5
        )
    if model in servers:
        return _Target(servers[model], None)
    if state.bases is not None and model in state.bases:
        raise _not_generative(f"{model} is an encoder base; it does not generate text")
    found = await run_in_threadpool(_find_adapter, request, tenant_id, model)
    if found is None:  # another tenant's included: its existence is never confirmed
        raise not_found("model", model, "model")
    key, task, base_model, base_fingerprint = found
    if task not in ("chat", "dpo"):
        raise _not_generative(f"adapter {model!r} is a {task} adapter; it does not generate text")
    server = generation_server(state, base_model, base_fingerprint, "model")
    return _Target(server, await run_in_threadpool(server.lora_weights, key))


def generation_server(
    state: AppState, base_model: str, base_fingerprint: str, param: str
) -> GenerationServer:
    """The generation server of the decoder an adapter was trained on (by its fingerprint, as
    /predict and /reward/compare check it): 422 ``base_model_mismatch`` naming ``param`` if
    this deployment does not load it (docs/architecture.md invariant 8)."""
    base = adapter_base(state.require_bases(), base_model, base_fingerprint, param)
    server = (state.generation or {}).get(base.name)
    if server is None:  # test hooks that set a base alone
        raise invalid(f"decoder {base.name!r} is not served here", param, "base_model_mismatch")
    return server


def _find_adapter(
    request: Request, tenant_id: str, name: str
) -> tuple[tuple[str, str, int], str, str, str] | None:
    """``(key, task, base_model, base_fingerprint)`` of the tenant's adapter ``name`` (or of
    the job checkpoint a checkpoint's model name names), or None."""
    with app_state(request).db_engine.connect() as conn:
        ref = find_adapter(conn, tenant_id, name)
    if ref is None:
        return None
    return ref.key, ref.task, ref.base_model, ref.base_fingerprint


async def _reward_key(
    request: Request, tenant_id: str, name: str, server: GenerationServer
) -> AdapterKey:
    """The key of the caller's reward adapter ``name`` on ``server``'s base (best-of-n),
    checked before anything is generated."""
    found = await run_in_threadpool(_find_adapter, request, tenant_id, name)
    if found is None:
        raise not_found("adapter", name, "reward_adapter")
    key, task, base_model, base_fingerprint = found
    if task != "reward":
        raise invalid(f"adapter {name!r} is a {task} adapter, not a reward model", "reward_adapter")
    bases = app_state(request).require_bases()
    if adapter_base(bases, base_model, base_fingerprint, "reward_adapter").name != server.name:
        raise invalid(
            f"reward adapter {name!r} scores on {base_model}, not on {server.name}",
            "reward_adapter",
        )
    return key


def _scorer(request: Request, server: GenerationServer) -> DecoderScorer:
    """The decoder's reward-model scorer (service.serving.decoder_scoring): the policy and the
    reward model share the one frozen base."""
    scorer = (app_state(request).decoder_scoring or {}).get(server.name)
    if scorer is None:
        raise unavailable(
            "The base models are still loading; retry shortly.", "model_not_ready", retry_after=5
        )
    return scorer


def _not_generative(message: str) -> ServiceError:
    return ServiceError(
        message, code="model_not_generative", param="model", kind=ErrorKind.UNSUPPORTED
    )


# --- sampling ------------------------------------------------------------------------------


def _params(
    body: SamplingFields, max_tokens: int, logprobs: bool, top_logprobs: int
) -> SamplingParams:
    from core.errors import ConfigError
    from core.generation.sampling import SamplingParams

    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            n=body.n,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            stop=body.stop_strings(),
        )
    except ConfigError as exc:
        raise invalid(exc.message, exc.field) from None


def _check_stream_options(body: SamplingFields) -> None:
    """``stream_options`` says how to stream: without ``stream`` it would be silently
    ignored (OpenAI refuses it too)."""
    if body.stream_options is not None and not body.stream:
        raise invalid("stream_options needs stream to be true", "stream_options")


def _max_tokens(asked: int | None, server: GenerationServer, prompt: list[int]) -> int:
    """What the caller asked for, or all the context leaves (at least one, so that a prompt
    that fills the context is refused by the scheduler naming the limit)."""
    return asked if asked is not None else max(1, server.context_length - len(prompt))


def _submit(
    server: GenerationServer,
    prompt: list[int],
    params: SamplingParams,
    adapter: LoraWeights | None,
    prompt_param: str,
    mode: MergeMode,
    tenant_id: str | None,
) -> Generation:
    from core.generation.scheduler import GenerationRequest

    # The tenant owns the request: its own waiting queue and share of the sequence slots.
    request = GenerationRequest(prompt, params, adapter, mode, owner=tenant_id)
    return server.submit(request, prompt_param)


@dataclass
class _Collected:
    """A finished request's candidates."""

    texts: list[str]
    finish: list[FinishReason | None]
    logprobs: list[list[TokenLogprob]]
    completion_tokens: list[int]


async def _collect(generation: Generation) -> _Collected:
    n = generation.n
    out = _Collected([""] * n, [None] * n, [[] for _ in range(n)], [0] * n)
    async for event in generation.events():
        i = event.index
        out.texts[i] += event.text
        out.logprobs[i].extend(event.logprobs)
        out.completion_tokens[i] = event.completion_tokens
        if event.finish_reason is not None:
            out.finish[i] = event.finish_reason
    return out


def _usage(generation: Generation, completion_tokens: int) -> Usage:
    return Usage.of(generation.prompt_tokens, completion_tokens, generation.cached_tokens)


def _token_bytes(server: GenerationServer, lps: list[TokenLogprob]) -> dict[int, bytes]:
    """The bytes of every token ``lps`` names (the chosen ones and the alternatives)."""
    ids = sorted({lp.token_id for lp in lps} | {t for lp in lps for t, _ in lp.top})
    return dict(zip(ids, server.token_bytes(ids), strict=True))


def _chat_logprobs(lps: list[TokenLogprob], pieces: dict[int, bytes]) -> ChoiceLogprobs:
    def top(token: int, logprob: float) -> TopLogprob:
        piece = pieces[token]
        return TopLogprob(token=token_text(piece), logprob=logprob, bytes=list(piece))

    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                **top(lp.token_id, lp.logprob).model_dump(),
                top_logprobs=[top(t, v) for t, v in lp.top],
            )
            for lp in lps
        ]
    )


class _TextOffsets:
    """Where each of a candidate's tokens starts in its text, in characters, token after token
    (over a whole reply, or over its stream's chunks in turn: the same numbers either way).

    A token that ends inside a UTF-8 character adds no character until the one that completes
    it does, as the text itself has none until then.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def of(self, pieces: list[bytes]) -> list[int]:
        starts = []
        for piece in pieces:
            starts.append(self._chars)
            self._chars += len(self._decoder.decode(piece))
        return starts


def _completion_logprobs(
    lps: list[TokenLogprob], pieces: dict[int, bytes], offsets: _TextOffsets
) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=[token_text(pieces[lp.token_id]) for lp in lps],
        token_logprobs=[lp.logprob for lp in lps],
        top_logprobs=[{token_text(pieces[t]): v for t, v in lp.top} for lp in lps],
        text_offset=offsets.of([pieces[lp.token_id] for lp in lps]),
    )


async def _said(
    server: GenerationServer, generation: Generation, completion: list[int]
) -> AsyncIterator[tuple[SequenceEvent, dict[int, bytes]]]:
    """A streamed request's events that have something to say (a held-back piece has nothing
    yet), each with the bytes of the tokens its logprobs name, read in a worker thread;
    ``completion`` keeps each candidate's generated tokens for the usage chunk."""
    async for event in generation.events():
        completion[event.index] = event.completion_tokens
        if not (event.text or event.finish_reason or event.logprobs):
            continue
        pieces: dict[int, bytes] = {}
        if event.logprobs:
            pieces = await run_in_threadpool(_token_bytes, server, event.logprobs)
        yield event, pieces


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


class _GenerationStream(StreamingResponse):
    """A streamed generation that frees the request's sequences however the response ends:
    a client gone before the first chunk leaves the body's generator never started (so its
    own ``finally`` never runs), and one gone between chunks leaves it suspended until
    garbage collection."""

    def __init__(self, generation: Generation, body: AsyncIterator[str]) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()  # a no-op once finished


def _stream(generation: Generation, chunks: AsyncIterator[str]) -> StreamingResponse:
    """SSE of ``chunks`` then ``[DONE]``; a failure mid-stream ends it with an error event.
    However the stream ends (the client gone included), the request's sequences are freed."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
            yield _sse("[DONE]")
        except ServiceError as exc:
            yield _sse(json.dumps(error_body(exc.message, "server_error", exc.param, exc.code)))

    return _GenerationStream(generation, body())


async def _finished(request: Request, generation: Generation) -> _Collected:
    try:
        return await unless_disconnected(request, _collect(generation))
    finally:
        generation.cancel()  # a no-op once finished; frees the slots of a client that left


@dataclass(frozen=True)
class Reply:
    """One conversation's reply (a single candidate), as ``/predict`` reports it."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


async def chat_replies(
    request: Request,
    server: GenerationServer,
    adapter: LoraWeights | None,
    conversations: list[list[dict[str, str]]],
    max_tokens: int,
    temperature: float,
    seed: int | None,
    param: str,
    mode: MergeMode,
    tenant_id: str | None,
) -> list[Reply]:
    """One reply to each conversation, rendered with the base's chat template as ``messages``
    is here, at most ``max_tokens`` each (fewer where the context leaves fewer). Every
    conversation is queued before any is awaited, so all decode in the same continuous batch;
    a refusal (queue full, context) names ``{param}.{i}`` and frees the ones already queued,
    and so does a client that disconnects."""
    from core.generation.sampling import SamplingParams

    prompts = await run_in_threadpool(
        lambda: [server.encode_chat(c, f"{param}.{i}") for i, c in enumerate(conversations)]
    )
    generations: list[Generation] = []

    async def collect_all() -> list[_Collected]:
        async with asyncio.TaskGroup() as group:  # one failing cancels the others
            tasks = [group.create_task(_collect(g)) for g in generations]
        return [t.result() for t in tasks]

    try:
        for i, prompt in enumerate(prompts):
            params = SamplingParams(
                max_tokens=min(max_tokens, _max_tokens(None, server, prompt)),
                temperature=temperature,
                seed=seed,
            )
            generations.append(
                _submit(server, prompt, params, adapter, f"{param}.{i}", mode, tenant_id)
            )
        done = await unless_disconnected(request, collect_all())
    finally:
        for generation in generations:
            generation.cancel()  # a no-op once finished
    return [
        Reply(
            d.texts[0],
            d.finish[0] or "length",
            g.prompt_tokens,
            d.completion_tokens[0],
            g.cached_tokens,
        )
        for g, d in zip(generations, done, strict=True)
    ]


def _response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# --- /v1/chat/completions ------------------------------------------------------------------


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    response_model_exclude_none=True,
    summary="Generate a chat reply",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def chat_completions(
    request: Request, body: ChatCompletionRequest, tenant_id: LongRequestTenantId
) -> ChatCompletion | StreamingResponse:
    """The assistant's reply to `messages`, rendered with the base's chat template, from the
    base or one of your chat/DPO adapters (`model`). With `stream: true`, server-sent
    `chat.completion.chunk` events and a final `[DONE]`."""
    _check_stream_options(body)
    if body.top_logprobs and not body.logprobs:
        raise invalid("top_logprobs needs logprobs to be true", "top_logprobs")
    if body.reward_adapter is not None and body.stream:
        raise ServiceError(
            "reward_adapter ranks whole candidates, so it cannot stream",
            code="unsupported_parameter",
            param="stream",
            kind=ErrorKind.UNSUPPORTED,
        )
    target = await _target(request, tenant_id, body.model)
    server = target.server
    reward = None
    if body.reward_adapter is not None:  # refused before anything is generated
        reward = await _reward_key(request, tenant_id, body.reward_adapter, server)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt = await run_in_threadpool(server.encode_chat, messages)
    asked = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    params = _params(
        body, _max_tokens(asked, server, prompt), body.logprobs, body.top_logprobs or 0
    )
    generation = _submit(server, prompt, params, target.adapter, "messages", body.mode, tenant_id)
    response_id, created = _response_id("chatcmpl"), int(time.time())
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = _chat_chunks(server, generation, response_id, created, body.model, usage)
        return _stream(generation, chunks)
    done = await _finished(request, generation)
    pieces = await run_in_threadpool(_token_bytes, server, [lp for c in done.logprobs for lp in c])
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=done.texts[i]),
            finish_reason=done.finish[i] or "length",
            logprobs=_chat_logprobs(done.logprobs[i], pieces) if body.logprobs else None,
        )
        for i in range(generation.n)
    ]
    if reward is not None:
        # Scored against the last user turn, as the reward model was trained on prompts.
        asked = next((m.text() for m in reversed(body.messages) if m.role == "user"), None)
        # A client gone meanwhile takes its candidates' rows out of the scorer's queue.
        scores = await unless_disconnected(
            request, _scorer(request, server).score(reward, asked, done.texts)
        )
        for choice, score in zip(choices, scores, strict=True):
            choice.reward = score
        choices.sort(key=lambda c: -(c.reward or 0.0))
    return ChatCompletion(
        id=response_id,
        created=created,
        model=body.model,
        choices=choices,
        usage=_usage(generation, sum(done.completion_tokens)),
    )


def _chat_chunks(
    server: GenerationServer,
    generation: Generation,
    response_id: str,
    created: int,
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    def choice(event: SequenceEvent, pieces: dict[int, bytes]) -> ChunkChoice:
        return ChunkChoice(
            index=event.index,
            delta=Delta(content=event.text) if event.text else Delta(),
            finish_reason=event.finish_reason,
            logprobs=_chat_logprobs(event.logprobs, pieces) if event.logprobs else None,
        )

    envelope = partial(ChatCompletionChunk, id=response_id, created=created, model=model)
    role = [
        ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(generation.n)
    ]
    return _chunks(server, generation, envelope, choice, include_usage, role)


# --- /v1/completions -----------------------------------------------------------------------


@router.post(
    "/v1/completions",
    response_model=Completion,
    response_model_exclude_none=True,
    summary="Continue a prompt",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def completions(
    request: Request, body: CompletionRequest, tenant_id: LongRequestTenantId
) -> Completion | StreamingResponse:
    """The continuation of `prompt` (no chat template), from the base or one of your
    chat/DPO adapters. With `stream: true`, server-sent `text_completion` chunks and a final
    `[DONE]`."""
    _check_stream_options(body)
    target = await _target(request, tenant_id, body.model)
    server = target.server
    prompt = await run_in_threadpool(server.encode_text, body.prompt)
    top = body.logprobs or 0
    params = _params(
        body, _max_tokens(body.max_tokens, server, prompt), body.logprobs is not None, top
    )
    generation = _submit(server, prompt, params, target.adapter, "prompt", body.mode, tenant_id)
    response_id, created = _response_id("cmpl"), int(time.time())
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = _completion_chunks(server, generation, response_id, created, body.model, usage)
        return _stream(generation, chunks)
    done = await _finished(request, generation)
    pieces = await run_in_threadpool(_token_bytes, server, [lp for c in done.logprobs for lp in c])
    return Completion(
        id=response_id,
        created=created,
        model=body.model,
        choices=[
            CompletionChoice(
                index=i,
                text=done.texts[i],
                finish_reason=done.finish[i] or "length",
                logprobs=(
                    _completion_logprobs(done.logprobs[i], pieces, _TextOffsets())
                    if body.logprobs is not None
                    else None
                ),
            )
            for i in range(generation.n)
        ],
        usage=_usage(generation, sum(done.completion_tokens)),
    )


def _completion_chunks(
    server: GenerationServer,
    generation: Generation,
    response_id: str,
    created: int,
    model: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    offsets = [_TextOffsets() for _ in range(generation.n)]

    def choice(event: SequenceEvent, pieces: dict[int, bytes]) -> CompletionChoice:
        i = event.index
        logprobs = None
        if event.logprobs:
            logprobs = _completion_logprobs(event.logprobs, pieces, offsets[i])
        return CompletionChoice(
            index=i, text=event.text, finish_reason=event.finish_reason, logprobs=logprobs
        )

    envelope = partial(Completion, id=response_id, created=created, model=model)
    return _chunks(server, generation, envelope, choice, include_usage)


async def _chunks(
    server: GenerationServer,
    generation: Generation,
    envelope: Callable[..., ChatCompletionChunk | Completion],
    choice: Callable[[SequenceEvent, dict[int, bytes]], ChunkChoice | CompletionChoice],
    include_usage: bool,
    first: list[ChunkChoice] | None = None,
) -> AsyncIterator[str]:
    """A stream's server-sent chunks, each ``envelope(choices=, usage=)``: ``first`` (chat's
    role chunk) if given, then one ``choice`` per event that says something, then the usage
    chunk if the client asked for it."""

    def sse(choices: list[Any], usage: Usage | None = None) -> str:
        return _sse(envelope(choices=choices, usage=usage).model_dump_json(exclude_none=True))

    if first:
        yield sse(first)
    completion = [0] * generation.n
    async for event, pieces in _said(server, generation, completion):
        yield sse([choice(event, pieces)])
    if include_usage:
        yield sse([], _usage(generation, sum(completion)))
