"""``POST /reward/compare?adapter=NAME``: which of two responses a reward model prefers."""

from __future__ import annotations

import math

from fastapi import APIRouter, Request

from core.pair_encoding import split_shared_prefix
from service.api.deps import AdapterName, ServedAdapter
from service.api.disconnect import served_results
from service.api.json_body import OffLoopJSONRoute
from service.api.schemas.inference import (
    CompareBatchResponse,
    ComparePair,
    CompareRequest,
    CompareResponse,
    CompareResult,
)
from service.errors import ServiceError, invalid, not_found
from service.serving.run import RowError, check_request_chars
from service.state import app_state

# Bodies parsed off the event loop (service.api.json_body).
router = APIRouter(tags=["inference"], route_class=OffLoopJSONRoute)


def _pairs(body: CompareRequest) -> list[ComparePair]:
    if body.pairs is not None:
        if body.prompt is not None:  # refused, not ignored: it would apply to no pair
            raise invalid("send each pair's prompt inside the pair, not beside pairs", "prompt")
        if body.response_a is not None or body.response_b is not None:
            raise invalid("send either response_a/response_b or pairs, not both", "pairs")
        return body.pairs
    for field in ("response_a", "response_b"):
        if getattr(body, field) is None:
            raise invalid(f"{field} is required (or send pairs)", field, "missing")
    return [ComparePair(prompt=body.prompt, response_a=body.response_a, response_b=body.response_b)]


def _named(error: RowError, body: CompareRequest, pairs: list[ComparePair]) -> ServiceError:
    """``error`` about the field it concerns: its row is one response of a pair (two rows a
    pair, each with the pair's prompt), and the prompt is at fault where the response alone
    is not (a prompt split from two whole dialogues is theirs, named by the response)."""
    k, side = divmod(error.row, 2)
    response = ("response_a", "response_b")[side]
    prompted = bool(pairs[k].prompt)
    field = "prompt" if prompted and error.first_text else response
    param = field if body.pairs is None else f"pairs.{k}.{field}"
    if not prompted:
        return error.named(param, param)
    return error.named(f"{param} with {'its prompt' if field == response else response}", param)


def _result(reward_a: float, reward_b: float) -> CompareResult:
    # sigmoid(a - b), computed without overflow for large margins.
    d = reward_a - reward_b
    p = 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))
    return CompareResult(
        reward_a=reward_a, reward_b=reward_b, p_a_preferred=p, preferred="a" if p >= 0.5 else "b"
    )


@router.post(
    "/reward/compare",
    response_model=CompareResponse | CompareBatchResponse,
    summary="Compare two responses with a reward model",
    responses={200: {"description": "One comparison, or `results` for `pairs`."}},
)
async def compare(
    request: Request,
    body: CompareRequest,
    ref: ServedAdapter,
    adapter: AdapterName,
) -> CompareResponse | CompareBatchResponse:
    """Scores both responses with the reward adapter named in `adapter` (with the prompt as
    the first text of a pair, as in training) and says which one it prefers and how surely.
    Without a prompt, two whole dialogues are split at their last shared turn when the adapter
    was trained so (`split_shared_prefix`, the default)."""
    if ref is None:
        raise not_found("adapter", adapter, "adapter")
    if ref.task != "reward":
        raise invalid(
            f"adapter {adapter!r} is a {ref.task} adapter; /reward/compare needs a reward model",
            "adapter",
            "adapter_task_mismatch",
        )
    pairs = _pairs(body)
    # The texts as sent: the rows below hold less where a prompt is split from two dialogues.
    sent = [(t, None) for p in pairs for t in (p.prompt, p.response_a, p.response_b) if t]
    check_request_chars(sent, app_state(request).settings.max_request_chars, "pairs")
    items: list[tuple[str, str | None]] = []
    for p in pairs:
        prompt, a, b = p.prompt, p.response_a, p.response_b
        if not prompt and ref.split_shared_prefix:
            # Whole dialogues, as the adapter was trained on them: the shared turns are the
            # prompt (training's own function, so a pair is scored as it was trained).
            prompt, a, b = split_shared_prefix(a, b) or (prompt, a, b)
        for response in (a, b):
            items.append((prompt, response) if prompt else (response, None))
    try:
        results = await served_results(request, ref, items, body.truncate, "pairs", "auto")
    except RowError as e:
        raise _named(e, body, pairs) from None
    rewards = [float(r.reward) for r in results]  # type: ignore[arg-type]
    out = [_result(rewards[2 * i], rewards[2 * i + 1]) for i in range(len(pairs))]
    if body.pairs is not None:
        return CompareBatchResponse(adapter=adapter, results=out)
    return CompareResponse(adapter=adapter, **out[0].model_dump())
