"""``POST /v1/fine_tuning/jobs`` refuses NaN and Infinity in every float setting, naming it.

FastAPI reads a body with ``json.loads``, which takes ``NaN``, ``Infinity`` and ``1e400``
(infinity): ``"margin": NaN`` trained a NaN model that ended ``succeeded`` on SQLite and was a
500 on PostgreSQL (its JSON has no NaN). Nothing of a refused job is stored.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.service.helpers import Headers, assert_error, create_dataset

JOBS = "/v1/fine_tuning/jobs"
PREFERENCES = [{"chosen": "a", "rejected": "b"}, {"chosen": "c", "rejected": "d"}]
VALUE = "<value>"


def _post(client: TestClient, auth: Headers, body: dict[str, Any], value: str) -> httpx.Response:
    """``body`` with ``value`` (JSON text: ``NaN``, ``1e400``) where it holds :data:`VALUE`;
    sent as text, as httpx refuses to encode a NaN."""
    text = json.dumps(body).replace(json.dumps(VALUE), value)
    return client.post(JOBS, headers=auth | {"Content-Type": "application/json"}, content=text)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize(
    "setting", ["margin", "adam_epsilon", "max_grad_norm", "center_rewards_coefficient"]
)
def test_a_non_finite_hyperparameter_is_a_422_naming_it(
    client: TestClient, auth: Headers, setting: str, value: str
) -> None:
    prefs = create_dataset(client, auth, PREFERENCES, kind="preference")
    hyper = {"max_steps": 1, setting: VALUE}
    body = {"training_file": prefs, "method": {"type": "lora", "hyperparameters": hyper}}
    param = f"method.hyperparameters.{setting}"
    error = assert_error(_post(client, auth, body, value), 422, param=param, code="finite_number")
    assert error["message"] == f"{param}: Input should be a finite number"
    assert client.get(JOBS, headers=auth).json()["data"] == []


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_a_non_finite_method_parameter_is_a_422_naming_it(
    client: TestClient, auth: Headers, value: str
) -> None:
    train = create_dataset(client, auth)
    body = {"training_file": train, "method": {"type": "lora", "lora": {"alpha": VALUE}}}
    resp = _post(client, auth, body, value)
    assert_error(resp, 422, param="method.lora.alpha", code="finite_number")
    assert client.get(JOBS, headers=auth).json()["data"] == []


def test_openai_shaped_hyperparameters_are_held_to_the_same_rule(
    client: TestClient, auth: Headers
) -> None:
    prefs = create_dataset(client, auth, PREFERENCES, kind="preference")
    dpo = {"hyperparameters": {"margin": VALUE}}
    body = {"training_file": prefs, "method": {"type": "dpo", "dpo": dpo}}
    resp = _post(client, auth, body, "NaN")
    assert_error(resp, 422, param="method.dpo.hyperparameters.margin", code="finite_number")
    assert client.get(JOBS, headers=auth).json()["data"] == []


def test_finite_values_still_make_a_job(client: TestClient, auth: Headers) -> None:
    prefs = create_dataset(client, auth, PREFERENCES, kind="preference")
    hyper = {"max_steps": 1, "margin": -0.5, "adam_epsilon": VALUE}
    method = {"type": "lora", "lora": {"alpha": 1e6}, "hyperparameters": hyper}
    resp = _post(client, auth, {"training_file": prefs, "method": method}, "1e300")
    assert resp.status_code == 200, resp.text
    assert resp.json()["method"]["hyperparameters"]["margin"] == -0.5
