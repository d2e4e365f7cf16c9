"""Ids, names and file names with a control character, on SQLite and PostgreSQL: a 422 naming
the field, never a 500 (PostgreSQL refuses a NUL in any text parameter) or a stored row; and an
upload's file name, when it names the dataset, held to the dataset name's limit.

The rule (``service.names``): no id or name holds a character
U+0000 to U+001F, whether it is looked up (404 would do there too, but one answer for every
place is simpler to rely on) or stored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from service.api.errors import install_error_handlers
from service.db.models import Dataset
from service.state import app_state
from tests.service.helpers import (
    CLASSIFICATION_ROWS,
    Headers,
    assert_error,
    create_dataset,
    jsonl,
    tenant_id_by_name,
)

NUL = "a\x00b"
NUL_URL = "a%00b"
CODE = "control_character"
JOBS = "/v1/fine_tuning/jobs"


def _nothing_stored(client: TestClient) -> None:
    with app_state(client.app).sessionmaker() as session:
        assert session.scalars(select(Dataset)).all() == []


# --- ids and names in the URL ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "param"),
    [
        ("GET", f"{JOBS}/{NUL_URL}", "job_id"),
        ("GET", f"{JOBS}/{NUL_URL}/events", "job_id"),
        ("GET", f"{JOBS}/{NUL_URL}/checkpoints", "job_id"),
        ("POST", f"{JOBS}/{NUL_URL}/cancel", "job_id"),
        ("GET", f"/v1/datasets/{NUL_URL}", "dataset_id"),
        ("DELETE", f"/v1/datasets/{NUL_URL}", "dataset_id"),
        ("GET", f"/v1/files/{NUL_URL}", "file_id"),
        ("GET", f"/v1/files/{NUL_URL}/content", "file_id"),
        ("DELETE", f"/v1/files/{NUL_URL}", "file_id"),
        ("GET", f"/v1/adapters/{NUL_URL}", "name"),
        ("DELETE", f"/v1/adapters/{NUL_URL}", "name"),
        ("GET", f"/v1/adapters/{NUL_URL}/export", "name"),
        ("GET", f"/v1/models/{NUL_URL}", "model_id"),
        ("DELETE", f"/v1/models/{NUL_URL}", "model_id"),
        ("GET", f"/v1/datasets?after={NUL_URL}", "after"),
        ("GET", f"/v1/files?after={NUL_URL}", "after"),
        ("GET", f"/v1/adapters?after={NUL_URL}", "after"),
        ("GET", f"{JOBS}?after={NUL_URL}", "after"),
        ("GET", f"{JOBS}/ftjob-none/events?after={NUL_URL}", "after"),
        ("GET", f"{JOBS}/ftjob-none/checkpoints?after={NUL_URL}", "after"),
        ("GET", f"{JOBS}?training_file={NUL_URL}", "training_file"),
        # Other control characters too: no id or name has one.
        ("GET", "/v1/datasets/a%1Fb", "dataset_id"),
        ("GET", f"{JOBS}/a%0Ab", "job_id"),
        ("GET", "/v1/models/abc%0A", "model_id"),  # a path parameter: newlines included
        ("DELETE", "/v1/models/a%0Ab", "model_id"),
    ],
)
def test_an_id_with_a_control_character_is_a_422_naming_it(
    client: TestClient, auth: Headers, method: str, path: str, param: str
) -> None:
    error = assert_error(client.request(method, path, headers=auth), 422, param=param, code=CODE)
    assert "control characters" in error["message"]


def test_the_caller_is_checked_first(client: TestClient) -> None:
    # 401, then 422: as for any other bad parameter.
    assert_error(client.get(f"/v1/datasets/{NUL_URL}"), 401, code="missing_api_key")
    assert_error(client.get(f"/v1/datasets?after={NUL_URL}"), 401, code="missing_api_key")


def test_ids_without_control_characters_still_answer_404(client: TestClient, auth: Headers) -> None:
    assert_error(client.get("/v1/datasets/a%20b", headers=auth), 404, code="dataset_not_found")


@pytest.mark.parametrize(
    ("method", "path", "param"),
    [
        ("GET", f"/v1/tenants/{NUL_URL}/keys", "tenant_id"),
        ("POST", f"/v1/tenants/{NUL_URL}/keys", "tenant_id"),
        ("GET", f"/v1/tenants?after={NUL_URL}", "after"),
    ],
)
def test_admin_routes_refuse_control_characters_in_ids(
    client: TestClient, admin: Headers, method: str, path: str, param: str
) -> None:
    body = {} if method == "POST" else None
    resp = client.request(method, path, headers=admin, json=body)
    assert_error(resp, 422, param=param, code=CODE)


def test_key_ids_with_a_nul_are_a_422(
    client: TestClient, admin: Headers, db: sessionmaker[Session]
) -> None:
    tenant = tenant_id_by_name(db)
    resp = client.delete(f"/v1/tenants/{tenant}/keys/{NUL_URL}", headers=admin)
    assert_error(resp, 422, param="key_id", code=CODE)
    resp = client.get(f"/v1/tenants/{tenant}/keys?after={NUL_URL}", headers=admin)
    assert_error(resp, 422, param="after", code=CODE)


# --- names and ids in bodies -------------------------------------------------------------------


@pytest.mark.parametrize("name", [NUL, "bell\x07"])
def test_an_api_key_name_with_a_control_character_is_refused_and_no_key_is_made(
    client: TestClient, admin: Headers, db: sessionmaker[Session], name: str
) -> None:
    keys = f"/v1/tenants/{tenant_id_by_name(db)}/keys"
    before = client.get(keys, headers=admin).json()["data"]
    resp = client.post(keys, headers=admin, json={"name": name})
    assert_error(resp, 422, param="name", code=CODE)
    assert client.get(keys, headers=admin).json()["data"] == before
    # Any other text is still a name.
    resp = client.post(keys, headers=admin, json={"name": "ci é"})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("field", ["training_file", "validation_file", "model"])
def test_a_job_naming_a_file_or_model_with_a_nul_is_refused(
    client: TestClient, auth: Headers, field: str
) -> None:
    train = create_dataset(client, auth)
    body = {"training_file": train, field: NUL}
    assert_error(client.post(JOBS, headers=auth, json=body), 422, param=field, code=CODE)
    assert client.get(JOBS, headers=auth).json()["data"] == []


# --- dataset names and file names ------------------------------------------------------------


def test_a_dataset_name_with_a_nul_is_refused_in_a_form(client: TestClient, auth: Headers) -> None:
    resp = client.post(
        "/v1/datasets",
        headers=auth,
        data={"kind": "classification", "name": NUL},
        files={"file": ("train.jsonl", jsonl(CLASSIFICATION_ROWS))},
    )
    error = assert_error(resp, 422, param="name", code=CODE)
    assert error["message"] == "name must not contain control characters (U+0000 to U+001F)."
    _nothing_stored(client)


def test_a_dataset_name_with_a_nul_is_refused_in_a_json_body(
    client: TestClient, auth: Headers
) -> None:
    body = {"kind": "classification", "name": NUL, "records": CLASSIFICATION_ROWS}
    resp = client.post("/v1/datasets", headers=auth, json=body)
    error = assert_error(resp, 422, param="name", code="invalid_name")
    assert "control characters" in error["message"]
    _nothing_stored(client)


def _multipart(filename: bytes, fields: dict[str, str]) -> tuple[bytes, Headers]:
    """A form with ``filename`` sent byte for byte: httpx escapes control characters in a
    file name (as browsers do), a client of its own need not."""
    parts = [
        f'--b\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="'
        + filename
        + b'"\r\n\r\n'
        + jsonl(CLASSIFICATION_ROWS)
        + b"\r\n--b--\r\n"
    )
    return b"".join(parts), {"Content-Type": "multipart/form-data; boundary=b"}


UPLOADS = [("/v1/datasets", {"kind": "classification"}), ("/v1/files", {"purpose": "fine-tune"})]


@pytest.mark.parametrize(("route", "form"), UPLOADS)
@pytest.mark.parametrize("filename", [b"t\x00.jsonl", b"t\x1b.jsonl"])
def test_a_file_name_with_a_control_character_is_refused(
    client: TestClient, auth: Headers, route: str, form: dict[str, str], filename: bytes
) -> None:
    body, headers = _multipart(filename, form)
    resp = client.post(route, headers=auth | headers, content=body)
    error = assert_error(resp, 422, param="file", code=CODE)
    assert error["message"] == (
        "The file's name must not contain control characters (U+0000 to U+001F)."
    )
    _nothing_stored(client)


def test_a_named_upload_does_not_need_a_clean_file_name(client: TestClient, auth: Headers) -> None:
    # The form's name names the dataset; the file's own is only read for its extension.
    body, headers = _multipart(b"t\x00.jsonl", {"kind": "classification", "name": "reviews"})
    resp = client.post("/v1/datasets", headers=auth | headers, content=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["name"] == "reviews"


@pytest.mark.parametrize(("route", "form"), UPLOADS)
def test_a_file_name_longer_than_a_dataset_name_is_refused(
    client: TestClient, auth: Headers, route: str, form: dict[str, str]
) -> None:
    # It names the dataset, whose name is at most 256 characters: PostgreSQL answered 500
    # (varchar(256)), SQLite stored all 306.
    files = {"file": ("f" * 300 + ".jsonl", jsonl(CLASSIFICATION_ROWS))}
    resp = client.post(route, headers=auth, data=form, files=files)
    error = assert_error(resp, 422, param="file")
    assert error["message"] == "The file's name must be at most 256 characters."
    _nothing_stored(client)


@pytest.mark.parametrize(("route", "form"), UPLOADS)
def test_a_file_name_of_256_characters_names_the_dataset(
    client: TestClient, auth: Headers, route: str, form: dict[str, str]
) -> None:
    filename = "f" * 250 + ".jsonl"
    files = {"file": (filename, jsonl(CLASSIFICATION_ROWS))}
    resp = client.post(route, headers=auth, data=form, files=files)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body.get("name", body.get("filename")) == filename


def test_a_long_file_name_is_no_matter_when_the_form_names_the_dataset(
    client: TestClient, auth: Headers
) -> None:
    files = {"file": ("f" * 300 + ".jsonl", jsonl(CLASSIFICATION_ROWS))}
    form = {"kind": "classification", "name": "reviews"}
    resp = client.post("/v1/datasets", headers=auth, data=form, files=files)
    assert resp.status_code == 200, resp.text
    assert resp.json()["name"] == "reviews"


def test_the_dry_run_refuses_what_the_upload_refuses(client: TestClient, auth: Headers) -> None:
    files = {"file": ("f" * 300 + ".jsonl", jsonl(CLASSIFICATION_ROWS))}
    resp = client.post("/v1/datasets/validate", headers=auth, files=files)
    assert_error(resp, 422, param="file")


# --- the inference routes' adapter -------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/predict", {"inputs": ["a fine film"]}),
        ("/reward/compare", {"prompt": "p", "response_a": "a", "response_b": "b"}),
    ],
)
def test_an_adapter_name_with_a_nul_is_a_422_after_the_caller(
    serving_client: TestClient, auth: Headers, path: str, body: dict[str, object]
) -> None:
    # The adapter is looked up before FastAPI validates parameters (one thread hop with the
    # caller's key): a NUL reached PostgreSQL there.
    url = f"{path}?adapter={NUL_URL}"
    assert_error(serving_client.post(url, json=body), 401, code="missing_api_key")
    resp = serving_client.post(url, headers=auth, json=body)
    assert_error(resp, 422, param="adapter", code=CODE)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"model": NUL, "messages": [{"role": "user", "content": "hi"}]},
            "model",
        ),
        ("/v1/completions", {"model": NUL, "prompt": "hi"}, "model"),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "reward_adapter": NUL},
            "reward_adapter",
        ),
    ],
)
def test_a_generation_model_with_a_nul_is_a_422_naming_it(
    client: TestClient, auth: Headers, path: str, body: dict[str, object], param: str
) -> None:
    # The model is looked up among the caller's adapters: a NUL reached PostgreSQL there.
    assert_error(client.post(path, headers=auth, json=body), 422, param=param, code=CODE)


# --- the safety net: a value the database refuses ------------------------------------------------


@pytest.fixture
def nul_query_app(database_url: str) -> Iterator[TestClient]:
    """An app with the service's error handlers whose one route sends a NUL to the database:
    what any route would meet were an edge check missing."""
    db_engine = create_engine(database_url)
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/lookup")
    def lookup() -> None:
        with db_engine.connect() as conn:
            conn.execute(select(Dataset.id).where(Dataset.id == NUL)).all()

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
    db_engine.dispose()


@pytest.mark.postgres_only
def test_a_value_the_database_refuses_is_a_422_and_a_warning(
    nul_query_app: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.api.errors"):
        resp = nul_query_app.get("/lookup")
    error = assert_error(resp, 422, code="unstorable_value")
    assert error["param"] is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("database refused a value on GET /lookup" in r.getMessage() for r in warnings)
