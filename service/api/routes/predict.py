"""``POST /predict?adapter=NAME&mode=auto|unmerged|merged``: labels or rewards for texts, or
for a chat or DPO adapter (or a decoder base named as the adapter) a generated reply to each
text, through /v1/chat/completions' own path
(:func:`service.api.routes.generation.chat_replies`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from service.api.deps import AdapterName, ServedAdapter, caller_tenant_id
from service.api.disconnect import served_results
from service.api.json_body import OffLoopJSONRoute
from service.api.routes.generation import chat_replies, generation_server
from service.api.schemas.generation import Usage
from service.api.schemas.inference import (
    Prediction,
    PredictRequest,
    PredictResponse,
    TextPair,
)
from service.errors import invalid, not_found
from service.serving.generation import GenerationServer
from service.serving.policy import RequestMode
from service.serving.queries import AdapterRef
from service.serving.run import check_request_chars
from service.state import app_state

# Bodies parsed off the event loop (service.api.json_body).
router = APIRouter(tags=["inference"], route_class=OffLoopJSONRoute)


def _items(body: PredictRequest) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for item in body.inputs:
        if isinstance(item, str):
            out.append((item, None))
        elif isinstance(item, TextPair):
            out.append((item.text, item.text_pair))
        else:
            out.append((item[0], item[1]))
    return out


GENERATING_TASKS = ("chat", "dpo")
# Fields only generation reads: refused, not ignored, for a classifier or reward model.
_SAMPLING_FIELDS = ("max_tokens", "temperature", "seed")


async def _generate(
    request: Request,
    body: PredictRequest,
    server: GenerationServer,
    ref: AdapterRef | None,
    name: str,
    mode: RequestMode,
) -> PredictResponse:
    """A reply to each input, sent as the user's one message, from ``ref``'s LoRA adapter or
    (``ref`` None) the base itself; all inputs decode in the same continuous batch."""
    settings = app_state(request).settings
    if body.max_tokens is not None and body.max_tokens > settings.predict_max_tokens:
        raise invalid(
            f"max_tokens is {body.max_tokens}; /predict generates at most "
            f"{settings.predict_max_tokens} tokens per input (LORAPLEX_PREDICT_MAX_TOKENS)",
            "max_tokens",
        )
    # Each input waits for a sequence slot as a request of its own: more than may wait at
    # once could never all be queued.
    if len(body.inputs) > settings.generation_max_waiting:
        raise invalid(
            f"{len(body.inputs)} inputs; a generating adapter takes at most "
            f"{settings.generation_max_waiting} per request (LORAPLEX_GENERATION_MAX_WAITING)",
            "inputs",
        )
    texts: list[str] = []
    for i, item in enumerate(body.inputs):
        if not isinstance(item, str):
            raise invalid(
                f"input {i} is a text pair; a chat adapter answers one text (the user's message)",
                f"inputs.{i}",
            )
        texts.append(item)
    weights = None
    if ref is not None:
        weights = await run_in_threadpool(server.lora_weights, ref.key, "adapter")
    replies = await chat_replies(
        request,
        server,
        weights,
        [[{"role": "user", "content": t}] for t in texts],
        body.max_tokens or settings.predict_max_tokens,
        body.temperature or 0.0,
        body.seed,
        "inputs",
        mode,
        ref.key[0] if ref is not None else await caller_tenant_id(request),
    )
    predictions = [
        Prediction(
            text=r.text,
            finish_reason=r.finish_reason,
            usage=Usage.of(r.prompt_tokens, r.completion_tokens, r.cached_tokens),
        )
        for r in replies
    ]
    task = ref.task if ref is not None else "chat"
    return PredictResponse(adapter=name, mode=mode, task=task, predictions=predictions)


@router.post(
    "/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    summary="Classify, score or answer texts",
)
async def predict(
    request: Request,
    body: PredictRequest,
    ref: ServedAdapter,
    adapter: AdapterName,
    mode: Annotated[
        RequestMode,
        Query(
            description="For LoRA adapters: `unmerged` shares one forward pass with other "
            "adapters, `merged` runs on a copy of the base with the adapter merged in, `auto` "
            "(default) lets the server choose by traffic. Other methods ignore it."
        ),
    ] = "auto",
) -> PredictResponse:
    """Runs the texts through the base model with the adapter named in `adapter`: labels
    with probabilities for a classifier, a reward per text for a reward model. Requests for
    different adapters are batched together and share one forward pass of the base model.

    A chat or DPO adapter, or a decoder base's id in `adapter`, generates a reply to each text
    (sent as the user's message, rendered with the base's chat template): its `text`,
    `finish_reason` and token `usage`, greedy unless `temperature` is above 0; the inputs
    decode in one continuous batch with every other generation on that base."""
    state = app_state(request)
    items = _items(body)
    check_request_chars(items, state.settings.max_request_chars, "inputs")
    servers = state.generation or {}
    if adapter in servers:  # a decoder base's id: the base itself answers
        return await _generate(request, body, servers[adapter], None, adapter, mode)
    if ref is None:
        raise not_found("adapter", adapter, "adapter")
    if ref.base_kind == "decoder" and ref.task in GENERATING_TASKS:
        server = generation_server(state, ref.base_model, ref.base_fingerprint, "adapter")
        return await _generate(request, body, server, ref, adapter, mode)
    for field in _SAMPLING_FIELDS:
        if getattr(body, field) is not None:
            raise invalid(f"{field} is for chat and DPO adapters, which generate", field)
    results = await served_results(request, ref, items, body.truncate, "inputs", mode)
    if ref.task == "reward":
        predictions = [Prediction(reward=r.reward) for r in results]
    else:
        predictions = [
            Prediction(
                label=r.label,
                score=(r.probabilities or {}).get(r.label or "", 0.0),
                probabilities=r.probabilities,
            )
            for r in results
        ]
    return PredictResponse(adapter=adapter, mode=mode, task=ref.task, predictions=predictions)
