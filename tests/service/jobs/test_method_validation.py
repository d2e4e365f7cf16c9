"""``validate_method`` asks core: bad method params and hyperparameters are 422s naming it."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.methods import parse_method_config
from core.targets import TARGET_MODULES
from core.training.config import parse_training_config
from service.jobs.validate import MAX_METHOD_JSON_BYTES, MethodConfigError, validate_method
from tests.service.helpers import Headers, assert_error, create_dataset

JOBS = "/v1/fine_tuning/jobs"


@pytest.mark.parametrize(
    ("method", "param"),
    [
        ({"type": "lora", "lora": {"r": 0}}, "lora.r"),
        ({"type": "lora", "lora": {"dropout": 1.0}}, "lora.dropout"),
        ({"type": "lora", "lora": {"target_modules": ["q_proj"]}}, "lora.target_modules"),
        ({"type": "lora", "lora": {"rank": 8}}, "lora.rank"),
        ({"type": "adapter", "adapter": {"non_linearity": "sigmoid"}}, "adapter.non_linearity"),
        ({"type": "prompt_tuning", "prompt_tuning": {"init": "text"}}, "prompt_tuning.init_text"),
        ({"type": "dora"}, "type"),
        (
            {"type": "lora", "hyperparameters": {"learning_rate": -1.0}},
            "hyperparameters.learning_rate",
        ),
        (
            {"type": "lora", "hyperparameters": {"lr_scheduler": "step"}},
            "hyperparameters.lr_scheduler",
        ),
        (
            {"type": "lora", "hyperparameters": {"warmup_ratio": 0.1, "warmup_steps": 5}},
            "hyperparameters.warmup_steps",
        ),
        ({"type": "lora", "hyperparameters": {"momentum": 0.9}}, "hyperparameters.momentum"),
    ],
)
def test_core_errors_name_the_field(method: dict[str, Any], param: str) -> None:
    with pytest.raises(MethodConfigError) as info:
        validate_method(method)
    assert info.value.param == param
    assert info.value.message.startswith(f"method.{param}: ")
    assert "Value error," not in info.value.message  # pydantic's prefix is stripped


@pytest.mark.parametrize(
    ("method", "method_values", "training_values"),
    [
        (
            {"type": "lora", "lora": {"r": 4, "target_modules": "all-linear"}},
            {"r": 4, "target_modules": list(TARGET_MODULES)},
            {"learning_rate": "auto"},  # unset: the method's own default at train time
        ),
        (
            {"type": "feature_extraction", "hyperparameters": {"max_steps": 20}},
            {},
            {"max_steps": 20},
        ),
        (
            {"type": "full", "full": {}, "hyperparameters": {"learning_rate": 5e-5}},
            {},
            {"learning_rate": 5e-5, "max_steps": None},
        ),
    ],
)
def test_valid_methods_pass(
    method: dict[str, Any], method_values: dict[str, Any], training_values: dict[str, Any]
) -> None:
    validate_method(method)  # raises MethodConfigError for anything core would reject
    # What the worker will train with: core reads the accepted block with the values given.
    parsed = parse_method_config(method["type"], dict(method.get(method["type"]) or {}))
    assert parsed.type == method["type"]
    assert {name: getattr(parsed, name) for name in method_values} == method_values
    training = parse_training_config(dict(method.get("hyperparameters") or {}))
    assert {name: getattr(training, name) for name in training_values} == training_values


def test_oversized_method_block() -> None:
    with pytest.raises(MethodConfigError, match="bytes"):
        validate_method({"type": "lora", "lora": {"x": "a" * MAX_METHOD_JSON_BYTES}})


@pytest.mark.parametrize(
    ("method", "param"),
    [
        ({"type": "lora", "lora": {"r": 0}}, "method.lora.r"),
        ({"type": "lora", "hyperparameters": {"learning_rate": -0.1}}, None),
        ({"type": "lora", "lora": {"target_modules": ["nope"]}}, "method.lora.target_modules"),
        ({"type": "lora", "lora": {"dropout": 1}}, "method.lora.dropout"),
        ({"type": "lora", "hyperparameters": {"lr_scheduler": "exp"}}, None),
        ({"type": "scratch"}, "method.type"),
        ({"type": "dora"}, "method.type"),
    ],
)
def test_job_creation_answers_422(
    client: TestClient, auth: Headers, method: dict[str, Any], param: str | None
) -> None:
    train = create_dataset(client, auth)
    resp = client.post(JOBS, json={"training_file": train, "method": method}, headers=auth)
    error = assert_error(resp, 422)
    # The schema's shape checks and core's checks may each catch a value first; both name it.
    expected = param or "method.hyperparameters." + next(iter(method["hyperparameters"]))
    assert error["param"] == expected, error
    assert client.get(JOBS, headers=auth).json()["data"] == []  # nothing was queued
