"""An adapter whose finite weights overflow to inf or NaN on some input answers that request
with a 409 ``non_finite_output`` naming the adapter and the input, never a 200 with nulls."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from core.adapter import Adapter
from service.state import app_state
from tests.core.inference.helpers import lora, reference
from tests.service.helpers import (
    Headers,
    assert_compare_names_the_non_finite_text,
    assert_error,
    store_adapter,
)

TEXTS = ["x", "good", "a longer sentence to score", "[SEP]", "bad"]


def _huge_head(adapter: Adapter, weight: float, bias: float = 0.0) -> Adapter:
    """Every head weight ``weight`` and bias ``bias``: finite, but float32 (3.4e38) overflows."""
    state = adapter.head_state
    head_state = {
        "out.weight": torch.full_like(state["out.weight"], weight),
        "out.bias": torch.full_like(state["out.bias"], bias),
    }
    return replace(adapter, head_state=head_state)


@pytest.mark.parametrize("n_labels", [None, 2], ids=["reward", "classification"])
def test_predict_refuses_a_non_finite_output(
    serving_client: TestClient, auth: Headers, n_labels: int | None
) -> None:
    base = app_state(serving_client.app).require_base_model()
    store_adapter(serving_client, auth, "nan", _huge_head(lora(base, r=2, n_labels=n_labels), 3e38))
    resp = serving_client.post("/predict?adapter=nan", json={"inputs": ["x"]}, headers=auth)
    error = assert_error(resp, 409, param="inputs.0", code="non_finite_output")
    assert "'nan'" in error["message"] and "input 0 " in error["message"]


def test_the_error_names_the_input_that_overflows(
    serving_client: TestClient, auth: Headers
) -> None:
    base = app_state(serving_client.app).require_base_model()
    # Rewards near 3.2e38 to 3.45e38: past float32's largest for some texts only.
    rm = _huge_head(lora(base, r=2, seed=2, n_labels=None), 1e38, 3e38)
    store_adapter(serving_client, auth, "rm", rm)
    finite = [t for t in TEXTS if math.isfinite(float(reference(base, rm, t)[0]))]
    overflows = [t for t in TEXTS if t not in finite]
    assert finite and overflows
    ok, bad = finite[0], overflows[0]

    def post(path: str, body: dict[str, Any]) -> httpx.Response:
        return serving_client.post(f"{path}?adapter=rm", json=body, headers=auth)

    resp = post("/predict", {"inputs": [ok, ok, bad]})
    assert_error(resp, 409, param="inputs.2", code="non_finite_output")
    assert_compare_names_the_non_finite_text(post, ok, bad)
