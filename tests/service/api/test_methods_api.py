"""Methods and hyperparameters have one definition, core's: the API schema, ``GET /v1/methods``
and the job request's validation all agree with it, field by field."""

from __future__ import annotations

import inspect
import math
from typing import Any

import annotated_types as at
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from core.errors import ConfigError
from core.methods import METHODS, parse_method_config
from core.training.config import (
    DEFAULT_LEARNING_RATES,
    DPO_ONLY_SETTINGS,
    TrainingConfig,
    parse_training_config,
)
from service.api.schemas.methods import SERVER_SETTINGS
from tests.service.helpers import CLASSIFICATION_ROWS, Headers, assert_error, create_dataset

JOBS = "/v1/fine_tuning/jobs"
API_METHODS = [m for m in METHODS if m != "scratch"]  # scratch: a core baseline, not served
USER_SETTINGS = [f for f in TrainingConfig.model_fields if f not in SERVER_SETTINGS]


# annotated_types constraint → (its attribute, the JSON Schema keyword it becomes)
_CONSTRAINTS = {
    at.Ge: ("ge", "minimum"),
    at.Gt: ("gt", "exclusiveMinimum"),
    at.Le: ("le", "maximum"),
    at.Lt: ("lt", "exclusiveMaximum"),
}


def _bounds(model: type[BaseModel], field: str) -> dict[str, float]:
    """The numeric range core declares on ``field``: on the field, a union member or an item."""
    info = model.model_fields[field]
    metadata = list(info.metadata)
    for member in getattr(info.annotation, "__args__", ()):
        for extra in getattr(member, "__metadata__", ()):  # Annotated[float, Field(...)]
            metadata += getattr(extra, "metadata", [extra])
    out: dict[str, float] = {}
    for item in metadata:
        for kind, (attr, key) in _CONSTRAINTS.items():
            if isinstance(item, kind):
                out[key] = getattr(item, attr)
    return out


def _schema_bounds(prop: dict[str, Any]) -> dict[str, float]:
    keys = [key for _, key in _CONSTRAINTS.values()]
    out: dict[str, float] = {}
    branches = [prop, *prop.get("anyOf", [])]
    for branch in [*branches, *(i for b in branches for i in b.get("prefixItems", []))]:
        out |= {k: branch[k] for k in keys if k in branch}
    return out


def _default(model: type[BaseModel], field: str) -> Any:
    value = model.model_fields[field].get_default(call_default_factory=True)
    return list(value) if isinstance(value, tuple) else value


@pytest.fixture
def catalog(client: TestClient, auth: Headers) -> dict[str, Any]:
    resp = client.get("/v1/methods", headers=auth)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


@pytest.fixture
def openapi(client: TestClient) -> dict[str, Any]:
    schemas: dict[str, Any] = client.get("/openapi.json").json()["components"]["schemas"]
    return schemas


def test_methods_needs_a_key(client: TestClient) -> None:
    assert_error(client.get("/v1/methods"), 401)


def test_every_served_method_is_listed_with_cores_defaults(catalog: dict[str, Any]) -> None:
    assert [m["type"] for m in catalog["data"]] == API_METHODS
    for entry in catalog["data"]:
        core_cls = METHODS[entry["type"]]
        assert {"type": entry["type"], **entry["defaults"]} == parse_method_config(
            entry["type"]
        ).to_dict()
        assert entry["description"] == inspect.cleandoc(core_cls.__doc__ or "")
        props = entry["schema"]["properties"]
        assert set(props) == set(core_cls.model_fields)
        for field, prop in props.items():
            assert prop["description"] == core_cls.model_fields[field].description
            assert prop["default"] == _default(core_cls, field), field
            assert _schema_bounds(prop) == _bounds(core_cls, field), field


def test_training_settings_and_per_task_defaults(catalog: dict[str, Any]) -> None:
    hyper = catalog["hyperparameters"]
    core_defaults = TrainingConfig().to_dict()
    assert hyper["defaults"] == {k: core_defaults[k] for k in USER_SETTINGS}
    assert list(hyper["schema"]["properties"]) == USER_SETTINGS
    for field, prop in hyper["schema"]["properties"].items():
        assert _schema_bounds(prop) == _bounds(TrainingConfig, field), field
        assert prop["default"] == _default(TrainingConfig, field), field
    lora = next(m for m in catalog["data"] if m["type"] == "lora")
    full = next(m for m in catalog["data"] if m["type"] == "full")
    assert (
        full["tasks"]["classification"]["hyperparameters"]["learning_rate"]
        == (DEFAULT_LEARNING_RATES["full"])
    )
    preference = lora["tasks"]["preference"]["hyperparameters"]
    classification = lora["tasks"]["classification"]["hyperparameters"]
    assert preference["learning_rate"] == DEFAULT_LEARNING_RATES["lora"]
    # Reward-model settings only where a preference dataset reads them.
    assert preference["margin"] == 0.0 and "margin" not in classification
    assert classification["warmup_steps"] is None and classification["n_epochs"] == 3


@pytest.mark.parametrize(
    ("schema_name", "core_model"),
    [("Hyperparameters", TrainingConfig)]
    + [("".join(p.title() for p in m.split("_")) + "Params", METHODS[m]) for m in API_METHODS],
)
def test_openapi_request_schema_matches_core_field_by_field(
    openapi: dict[str, Any], schema_name: str, core_model: type[BaseModel]
) -> None:
    schema = openapi[schema_name]
    expected = [f for f in core_model.model_fields if f not in SERVER_SETTINGS]
    assert list(schema["properties"]) == expected
    assert schema["additionalProperties"] is False
    for field, prop in schema["properties"].items():
        assert prop["description"] == core_model.model_fields[field].description, field
        # FastAPI's OpenAPI document leaves out null defaults.
        assert prop.get("default") == _default(core_model, field), field
        assert _schema_bounds(prop) == _bounds(core_model, field), field


def _probes(model: type[BaseModel], field: str) -> list[Any]:
    """Values on and just past each declared bound, and a wrong type."""
    values: list[Any] = ["not-a-value"]
    for bound in _bounds(model, field).values():
        step = 1 if isinstance(bound, int) and not isinstance(bound, bool) else 1e-6
        values += [bound - step, bound, bound + step]
    if field == "adam_betas":
        values = [[v, 0.5] for v in values if not isinstance(v, str)] + ["x"]
    return [v for v in values if not (isinstance(v, float) and math.isinf(v))]


@pytest.mark.parametrize("field", USER_SETTINGS)
def test_request_model_accepts_what_core_accepts(field: str) -> None:
    from service.api.schemas.methods import Hyperparameters

    for value in _probes(TrainingConfig, field):
        try:
            parse_training_config({field: value})
            core_ok = True
        except ConfigError:
            core_ok = False
        try:
            Hyperparameters(**{field: value})
            api_ok = True
        except ValidationError as exc:
            api_ok = False
            assert exc.errors()[0]["loc"] == (field,)  # the field itself, not a union member
        assert api_ok == core_ok, (field, value)


@pytest.mark.parametrize("method", API_METHODS)
def test_method_blocks_accept_what_core_accepts(method: str) -> None:
    from service.api.schemas.methods import METHOD_PARAMS

    model = METHODS[method]
    for field in model.model_fields:
        for value in _probes(model, field):
            try:
                parse_method_config(method, {field: value})
                core_ok = True
            except ConfigError:
                core_ok = False
            try:
                METHOD_PARAMS[method](**{field: value})
                api_ok = True
            except ValidationError:
                api_ok = False
            # The API checks types and ranges; core alone checks cross-field rules and
            # validators (target names, init_text), so the API may accept more, never less.
            assert api_ok or not core_ok, (method, field, value)
            if field not in ("target_modules", "init_text"):
                assert api_ok == core_ok, (method, field, value)


def test_openapi_documents_openai_method_types(openapi: dict[str, Any]) -> None:
    assert set(openapi["MethodType"]["enum"]) == {*API_METHODS, "supervised", "dpo"}
    spec = openapi["MethodSpec"]["properties"]
    assert {*API_METHODS, "supervised", "dpo", "type", "hyperparameters"} == set(spec)
    dpo = openapi["OpenAIDpoHyperparameters"]["properties"]
    assert {"n_epochs", "batch_size", "learning_rate_multiplier", "beta"} <= set(dpo)


def test_settings_the_api_never_exposed_before_are_accepted(
    client: TestClient, auth: Headers
) -> None:
    # 4 rows a label, so 20% holds out one of each (a share that holds out none is refused).
    train = create_dataset(client, auth, CLASSIFICATION_ROWS * 2)
    hyper = {
        "warmup_steps": 3,
        "max_grad_norm": 0.5,
        "validation_fraction": 0.2,
        "metric_for_best": "loss",
        "eval_every_steps": 5,
        "early_stopping_patience": 2,
        "learning_rate": "auto",
        "adam_betas": [0.8, 0.99],
    }
    method = {"type": "lora", "lora": {"alpha": 8, "use_rslora": True}, "hyperparameters": hyper}
    resp = client.post(JOBS, json={"training_file": train, "method": method}, headers=auth)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["method"]["hyperparameters"] == hyper
    assert job["method"]["lora"] == {"alpha": 8.0, "use_rslora": True}


@pytest.mark.parametrize(
    ("method", "param", "contains"),
    [
        (
            {"type": "lora", "hyperparameters": {"early_stopping_patience": 0}},
            None,
            "or equal to 1",
        ),
        ({"type": "lora", "hyperparameters": {"warmup_ratio": 1.5}}, None, "or equal to 1"),
        ({"type": "lora", "hyperparameters": {"max_seq_length": 3}}, None, "or equal to 4"),
        ({"type": "lora", "hyperparameters": {"learning_rate": "fast"}}, None, None),
        ({"type": "lora", "hyperparameters": {"adam_betas": [0.9, 1.0]}}, None, None),
        ({"type": "lora", "hyperparameters": {"gradual_unfreezing": -1}}, None, None),
        ({"type": "lora", "hyperparameters": {"lernrate": 0.1}}, None, None),
        ({"type": "lora", "lora": {"alpha": 0}}, "method.lora.alpha", None),
        ({"type": "lora", "lora": {"rnak": 4}}, "method.lora.rnak", None),
        ({"type": "adapter", "adapter": {"placement": "x"}}, "method.adapter.placement", None),
        ({"type": "full", "full": {"lr": 1}}, "method.full.lr", None),
    ],
)
def test_bad_values_are_422s_naming_the_field(
    client: TestClient,
    auth: Headers,
    method: dict[str, Any],
    param: str | None,
    contains: str | None,
) -> None:
    train = create_dataset(client, auth)
    resp = client.post(JOBS, json={"training_file": train, "method": method}, headers=auth)
    expected = param or "method.hyperparameters." + next(iter(method["hyperparameters"]))
    assert_error(resp, 422, param=expected, contains=contains)


@pytest.mark.parametrize("setting", sorted(SERVER_SETTINGS))
def test_server_decided_settings_are_refused_with_the_reason(
    client: TestClient, auth: Headers, setting: str
) -> None:
    train = create_dataset(client, auth)
    method = {"type": "lora", "hyperparameters": {setting: 1}}
    resp = client.post(JOBS, json={"training_file": train, "method": method}, headers=auth)
    assert_error(resp, 422, param=f"method.hyperparameters.{setting}", contains="set by the server")


def test_dpo_settings_are_listed_for_dpo_and_refused_elsewhere(
    client: TestClient, auth: Headers, catalog: dict[str, Any]
) -> None:
    # DPO's settings are listed, and shown among a dpo dataset's defaults only; a job of another
    # task that sets one is refused, naming the field, rather than run without it.
    assert {"beta", "label_smoothing"} == DPO_ONLY_SETTINGS
    assert set(catalog["hyperparameters"]["schema"]["properties"]) >= DPO_ONLY_SETTINGS
    assert catalog["hyperparameters"]["defaults"]["beta"] == 0.1
    for entry in catalog["data"]:
        for kind, task in entry["tasks"].items():
            listed = DPO_ONLY_SETTINGS & set(task["hyperparameters"])
            assert listed == (DPO_ONLY_SETTINGS if kind == "dpo" else set()), entry["type"]
    lora = next(e for e in catalog["data"] if e["type"] == "lora")
    assert {"chat", "dpo"} <= set(lora["tasks"])
    # A method that does not train a decoder lists no decoder task.
    adapter = next(e for e in catalog["data"] if e["type"] == "adapter")
    assert set(adapter["tasks"]) == {"classification", "preference"}
    train = create_dataset(client, auth)
    preference = create_dataset(client, auth, [{"chosen": "a", "rejected": "b"}], kind="preference")
    for file in (train, preference):
        for setting in sorted(DPO_ONLY_SETTINGS):
            method = {"type": "lora", "hyperparameters": {setting: 0.1}}
            resp = client.post(JOBS, json={"training_file": file, "method": method}, headers=auth)
            assert_error(
                resp, 422, param=f"method.hyperparameters.{setting}", contains="DPO on a decoder"
            )
