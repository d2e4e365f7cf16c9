"""The error shape: every failure answers {"error": {message, type, param, code}}."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.pool import QueuePool

from service.adapters.archive import ArchiveError
from service.adapters.transfer import TransferError
from service.api.errors import loc_to_param, sent_steps
from service.api.schemas.inference import MAX_TEXT_CHARS
from service.config import Settings
from service.datasets.rows import DatasetError
from service.errors import ErrorKind, ServiceError, unavailable
from service.jobs.validate import MethodConfigError
from service.main import create_app
from service.state import app_state
from tests.service.conftest import make_settings
from tests.service.helpers import (
    CLASSIFICATION_ROWS,
    Headers,
    assert_error,
    default_auth,
    jsonl,
    upload,
)


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


# --- union members in an error's location ---------------------------------------------------

LONG_TEXT = "x" * (MAX_TEXT_CHARS + 1)


@pytest.mark.parametrize(
    ("item", "param"),
    [
        (LONG_TEXT, "inputs.1"),
        (5, "inputs.1"),
        (["a", 5], "inputs.1.1"),
        ({"text": LONG_TEXT}, "inputs.1.text"),
        ({"text": 5}, "inputs.1.text"),
        ({"text_pair": "b"}, "inputs.1.text"),
    ],
    ids=["long-text", "number", "array-item", "long-object-text", "object-text", "no-text"],
)
def test_a_bad_predict_input_names_what_was_sent(
    client: TestClient, auth: Headers, item: object, param: str
) -> None:
    """An input is a union (a text, an array or an object): pydantic puts the member it tried
    in the location ("inputs.1.text" for a plain text, "inputs.1.object.text"), a field the
    client never sent."""
    resp = client.post("/predict?adapter=x", headers=auth, json={"inputs": ["fine", item]})
    error = assert_error(resp, 422, param=param)
    assert error["message"].startswith(f"{param}: ")


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([{"type": "text", "text": 5}], "messages.0.content.0.text"),
        ([{"type": "text"}], "messages.0.content.0.text"),
        ([{"type": "text", "text": "hi", "x": 1}], "messages.0.content.0.x"),
        (5, "messages.0.content"),
    ],
    ids=["part-text", "part-without-text", "part-extra-field", "number"],
)
def test_a_bad_message_content_names_what_was_sent(
    client: TestClient, auth: Headers, content: object, param: str
) -> None:
    # A message's content is a text or a list of parts; a part's error was "content.parts.0".
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    error = assert_error(client.post("/v1/chat/completions", headers=auth, json=body), 422)
    assert error["param"] == param and error["message"].startswith(f"{param}: ")


def test_a_job_body_mapped_before_validation_is_named_where_it_was_sent(
    client: TestClient, auth: Headers
) -> None:
    # OpenAI's deprecated top-level hyperparameters, and a supervised block's, are moved under
    # `method.hyperparameters` before validation; the errors name what the client sent.
    body = {"training_file": "file-x", "hyperparameters": {"n_epochs": "three"}}
    resp = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    assert_error(resp, 422, param="hyperparameters.n_epochs")
    body = {
        "training_file": "file-x",
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "x"}}},
    }
    resp = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    error = assert_error(resp, 422, param="method.supervised.hyperparameters.n_epochs")
    assert error["message"].startswith("method.supervised.hyperparameters.n_epochs: ")


def test_sent_steps_drops_the_union_members_pydantic_names() -> None:
    sent = {"items": ["text", {"name": 5}, [1]], "n": 1}
    # A plain union's member types, below a text, an object and a list.
    assert sent_steps(("items", 0, "str"), sent, "string_too_long") == ["items", 0]
    assert sent_steps(("items", 0, "function-after[f(), str]"), sent, "x") == ["items", 0]
    assert sent_steps(("items", 1, "Item", "name"), sent, "string_type") == ["items", 1, "name"]
    assert sent_steps(("items", 1, "Item", "size"), sent, "missing") == ["items", 1, "size"]
    assert sent_steps(("items", 2, "list[int]", 0), sent, "int_type") == ["items", 2, 0]
    assert sent_steps(("n",), sent, "int_type") == ["n"]
    assert sent_steps(("size",), sent, "missing") == ["size"]
    # Steps an object lacks that lead to no key of it: not the body sent, no tags to drop.
    assert sent_steps(("items", 1, "size", "unit"), sent, "string_type") is None


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


# Every kind of ServiceError and how it is answered; the 409/429 header keeps the OpenAI SDKs
# from retrying what a retry cannot fix, the 401 one is what RFC 6750 asks of a bearer API.
_RENDERED = [
    (ErrorKind.INVALID, 422, "invalid_request_error", {}),
    (ErrorKind.UNSUPPORTED, 400, "invalid_request_error", {}),
    (ErrorKind.NOT_FOUND, 404, "not_found_error", {}),
    (ErrorKind.CONFLICT, 409, "conflict_error", {"x-should-retry": "false"}),
    (ErrorKind.QUOTA, 429, "rate_limit_error", {"x-should-retry": "false"}),
    (ErrorKind.UNAVAILABLE, 503, "service_unavailable_error", {}),
    (ErrorKind.UNAUTHENTICATED, 401, "authentication_error", {"www-authenticate": "Bearer"}),
    (ErrorKind.FORBIDDEN, 403, "permission_error", {}),
    (ErrorKind.TOO_LARGE, 413, "invalid_request_error", {}),
    (ErrorKind.UNSUPPORTED_MEDIA_TYPE, 415, "invalid_request_error", {}),
    (ErrorKind.INTERNAL, 500, "server_error", {}),
]


def test_every_kind_is_rendered() -> None:
    assert {kind for kind, *_ in _RENDERED} == set(ErrorKind)


@pytest.mark.parametrize(("kind", "status", "type", "headers"), _RENDERED)
def test_service_error_is_rendered_by_kind(
    settings: Settings, kind: ErrorKind, status: int, type: str, headers: dict[str, str]
) -> None:
    app = create_app(settings, hooks=[])

    @app.get("/fails")
    def fails() -> None:
        raise ServiceError("it failed", code="some_code", param="some.field", kind=kind)

    with TestClient(app) as test_client:
        resp = test_client.get("/fails")
    assert_error(resp, status, code="some_code", param="some.field", type=type)
    assert resp.json()["error"]["message"] == "it failed"
    for name, value in headers.items():
        assert resp.headers[name] == value
    assert "retry-after" not in resp.headers


def test_retry_after_becomes_a_header(settings: Settings) -> None:
    app = create_app(settings, hooks=[])

    @app.get("/busy")
    def busy() -> None:
        raise unavailable("busy; retry shortly", "queue_full", retry_after=3)

    with TestClient(app) as test_client:
        resp = test_client.get("/busy")
    assert_error(resp, 503, code="queue_full", type="service_unavailable_error")
    assert resp.headers["retry-after"] == "3"


def test_domain_errors_preset_their_code_and_param() -> None:
    # What a refusal that gives neither answers with: the code and field the API reports.
    archive, transfer = ArchiveError("not a zip"), TransferError("weights missing")
    assert (archive.kind, archive.code, archive.param) == (
        ErrorKind.INVALID,
        "invalid_archive",
        "file",
    )
    assert (transfer.kind, transfer.code, transfer.param) == (
        ErrorKind.INVALID,
        "invalid_adapter",
        "file",
    )
    assert DatasetError("empty").code == "invalid_dataset"
    assert MethodConfigError("bad", param="method.lora.r").code == "invalid_method"


def test_loc_to_param() -> None:
    assert loc_to_param(("body", "method", "hyperparameters", "n_epochs")) == (
        "method.hyperparameters.n_epochs"
    )
    assert loc_to_param(("query", "limit")) == "limit"
    assert loc_to_param(("body", "records", 3, "text")) == "records.3.text"
    assert loc_to_param(("body",)) is None


@pytest.mark.sqlite_only
def test_a_database_locked_past_the_busy_timeout_is_a_503_and_stores_nothing(
    tmp_path: Path, database_url: str
) -> None:
    """Another process holding SQLite's write lock longer than ``sqlite_busy_timeout_ms`` is
    load, not a fault: 503 with Retry-After, nothing half-written, and the same request goes
    through once the lock is gone."""
    settings = make_settings(tmp_path, sqlite_busy_timeout_ms=50)
    with TestClient(create_app(settings, hooks=[])) as client:
        auth = default_auth(settings)
        holder = sqlite3.connect(tmp_path / "loraplex.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, as a worker's checkpoint holds it
        try:
            resp = upload(client, auth, jsonl(CLASSIFICATION_ROWS), name="locked")
            assert_error(resp, 503, code="database_busy", type="service_unavailable_error")
            assert resp.headers["retry-after"] == "1"
            # Reads go on under WAL while the lock is held: nothing was stored.
            assert client.get("/v1/datasets", headers=auth).json()["data"] == []
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        resp = upload(client, auth, jsonl(CLASSIFICATION_ROWS), name="locked")
        assert resp.status_code == 200, resp.text
        assert [d["name"] for d in client.get("/v1/datasets", headers=auth).json()["data"]] == [
            "locked"
        ]


def test_a_connection_pool_used_up_past_its_timeout_is_a_503(settings: Settings) -> None:
    app = create_app(settings, hooks=[])
    with TestClient(app) as client:
        auth = default_auth(settings)
        db_engine = app_state(app).db_engine
        pool = db_engine.pool
        assert isinstance(pool, QueuePool)
        # Every connection the pool may open, held, and a short wait for one.
        held = [db_engine.connect() for _ in range(pool.size() + pool._max_overflow)]
        pool._timeout = 0.1
        try:
            resp = client.get("/v1/datasets", headers=auth)
            assert_error(resp, 503, code="database_busy", type="service_unavailable_error")
            assert resp.headers["retry-after"] == "1"
        finally:
            for conn in held:
                conn.close()
        assert client.get("/v1/datasets", headers=auth).status_code == 200
