"""``POST /predict?adapter=NAME&mode=auto|unmerged|merged``: labels or rewards for texts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from service.api.deps import AdapterName, ServedAdapter
from service.api.disconnect import served_results
from service.api.json_body import OffLoopJSONRoute
from service.api.schemas.inference import (
    Prediction,
    PredictRequest,
    PredictResponse,
    TextPair,
)
from service.errors import not_found
from service.serving.policy import RequestMode

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


@router.post(
    "/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    summary="Classify or score texts",
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
    different adapters are batched together and share one forward pass of the base model."""
    if ref is None:
        raise not_found("adapter", adapter, "adapter")
    items = _items(body)
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
