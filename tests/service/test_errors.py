"""The error shape: every failure answers {"error": {message, type, param, code}}."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api.errors import ApiError, loc_to_param
from service.config import Settings
from service.main import create_app
from tests.service.helpers import Headers, assert_error


def test_unknown_url_is_404_in_standard_shape(client: TestClient) -> None:
    assert_error(
        client.get("/v1/nothing-here"), 404, code="unknown_url", contains="/v1/nothing-here"
    )


def test_wrong_method_is_405_in_standard_shape(client: TestClient) -> None:
    assert_error(client.put("/healthz"), 405, code="method_not_allowed")


def test_validation_error_names_the_dotted_field_path(client: TestClient, auth: Headers) -> None:
    body = {
        "training_file": "file-x",
        "method": {"type": "lora", "hyperparameters": {"learning_rate": -1}},
    }
    error = assert_error(
        client.post("/v1/fine_tuning/jobs", json=body, headers=auth),
        422,
        param="method.hyperparameters.learning_rate",
        type="invalid_request_error",
    )
    assert error["message"].startswith("method.hyperparameters.learning_rate: ")
    assert "greater than 0" in error["message"]


def test_missing_field_and_error_count(client: TestClient, auth: Headers) -> None:
    error = assert_error(
        client.post("/v1/fine_tuning/jobs", json={"seed": -1}, headers=auth), 422, code="missing"
    )
    assert error["param"] in {"training_file", "method"}
    assert "more error" in error["message"]


def test_malformed_json_body(client: TestClient, auth: Headers) -> None:
    error = assert_error(
        client.post(
            "/v1/fine_tuning/jobs",
            content=b'{"training_file": ',
            headers=auth | {"Content-Type": "application/json"},
        ),
        422,
        code="json_invalid",
    )
    assert error["param"] is None
    assert "not valid JSON" in error["message"]


def test_query_param_validation(client: TestClient, auth: Headers) -> None:
    assert_error(client.get("/v1/datasets?limit=0", headers=auth), 422, param="limit")


def test_unhandled_exception_is_a_generic_500(settings: Settings) -> None:
    app: FastAPI = create_app(settings, hooks=[])

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internal detail /etc/passwd")

    with TestClient(app, raise_server_exceptions=False) as test_client:
        resp = test_client.get("/boom")
    error = assert_error(resp, 500, code="internal_error", type="server_error")
    assert "secret" not in resp.text and "RuntimeError" not in resp.text
    assert error["param"] is None


def test_api_error_carries_headers(settings: Settings) -> None:
    app = create_app(settings, hooks=[])

    @app.get("/limited")
    def limited() -> None:
        raise ApiError(
            429, "slow down", "rate_limit_error", None, "rate_limited", {"Retry-After": "3"}
        )

    with TestClient(app) as test_client:
        resp = test_client.get("/limited")
    assert_error(resp, 429, code="rate_limited", type="rate_limit_error")
    assert resp.headers["retry-after"] == "3"


def test_loc_to_param() -> None:
    assert loc_to_param(("body", "method", "hyperparameters", "n_epochs")) == (
        "method.hyperparameters.n_epochs"
    )
    assert loc_to_param(("query", "limit")) == "limit"
    assert loc_to_param(("body", "records", 3, "text")) == "records.3.text"
    assert loc_to_param(("body",)) is None
