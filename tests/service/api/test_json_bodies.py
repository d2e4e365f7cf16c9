"""Large JSON bodies cost the event loop nothing and are refused before they cost much: a
dataset's records are parsed in a worker thread as they arrive, up to the row cap; an
inference body is parsed in a worker thread, an unknown field refused before its value is
read, a list's items counted against its cap as they are read."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.json_body import MAX_VALUE_CHARS
from service.api.schemas.inference import MAX_INPUTS, MAX_PAIRS
from service.jsonstream import ObjectReader
from service.main import create_app
from tests.service.conftest import make_settings
from tests.service.helpers import CLASSIFICATION_ROWS, Headers, assert_error

JSON = {"Content-Type": "application/json"}
MAX_ROWS = 5
# What follows in a body past the point reading must stop at: unreadable as JSON.
UNREADABLE = b", oops"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, max_dataset_rows=MAX_ROWS)
    with TestClient(create_app(settings, hooks=[])) as test_client:
        yield test_client


@pytest.fixture
def auth(client: TestClient, tmp_path: Path) -> Headers:
    key = (tmp_path / "default_api_key").read_text().strip()
    return {"Authorization": f"Bearer {key}"} | JSON


def test_records_past_the_row_cap_are_refused_unread(client: TestClient, auth: Headers) -> None:
    records = json.dumps({"kind": "classification", "records": CLASSIFICATION_ROWS * 2})
    body = records[:-2].encode() + UNREADABLE  # cut after MAX_ROWS + 3 records
    resp = client.post("/v1/datasets", content=body, headers=auth)
    assert_error(resp, 422, param="records", code="too_many_rows", contains="5 rows")
    report = client.post("/v1/datasets/validate", content=body, headers=auth).json()
    assert [(e["param"], e["code"]) for e in report["errors"]] == [("records", "too_many_rows")]


@pytest.mark.parametrize("path", ["/predict?adapter=x", "/reward/compare?adapter=x"])
def test_an_unknown_field_is_refused_before_its_value_is_read(
    client: TestClient, auth: Headers, path: str
) -> None:
    body = b'{"truncate": true, "junk": [{}, {}' + UNREADABLE
    resp = client.post(path, content=body, headers=auth)
    assert_error(resp, 422, param="junk", code="extra_forbidden")


@pytest.mark.parametrize(
    ("path", "field", "item", "cap"),
    [
        ("/predict?adapter=x", "inputs", '"a"', MAX_INPUTS),
        ("/reward/compare?adapter=x", "pairs", '{"response_a": "a", "response_b": "b"}', MAX_PAIRS),
    ],
)
def test_list_items_past_the_cap_are_refused_unread(
    client: TestClient, auth: Headers, path: str, field: str, item: str, cap: int
) -> None:
    body = f'{{"{field}": [{", ".join([item] * (cap + 1))}'.encode() + UNREADABLE
    resp = client.post(path, content=body, headers=auth)
    assert_error(resp, 422, param=field, code="too_long")
    # A bad item is named at its index, before the rest is read.
    body = f'{{"{field}": [{item}, 7'.encode() + UNREADABLE
    error = assert_error(client.post(path, content=body, headers=auth), 422)
    assert error["param"].startswith(f"{field}.1")


def test_the_key_is_checked_before_the_body_is_refused(client: TestClient) -> None:
    resp = client.post("/predict?adapter=x", content=b'{"junk": 1}', headers=JSON)
    assert_error(resp, 401, code="missing_api_key")


def _hold_until_answered(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the JSON parser wait, once it has started on a body, until a /healthz request
    sent meanwhile has been answered; returns the order of events: 'healthz' when that answer
    arrives, 'parsing' when the parser goes on. On a blocked event loop the parser goes on
    first (its wait times out) and /healthz is answered only after."""
    parsing, answered = threading.Event(), threading.Event()
    real = ObjectReader.members
    order: list[str] = []

    def held(*args: Any, **kwargs: Any) -> Any:
        if not parsing.is_set():
            parsing.set()
            # Bounded only so that a blocked event loop fails the test instead of hanging it.
            answered.wait(timeout=30)
            order.append("parsing")
        return real(*args, **kwargs)

    def probe() -> None:
        assert parsing.wait(timeout=30)
        assert client.get("/healthz").status_code == 200
        order.append("healthz")
        answered.set()

    monkeypatch.setattr(ObjectReader, "members", held)
    threading.Thread(target=probe, daemon=True).start()
    return order


def test_a_dataset_body_is_parsed_off_the_event_loop(
    client: TestClient, auth: Headers, monkeypatch: pytest.MonkeyPatch
) -> None:
    order = _hold_until_answered(client, monkeypatch)
    body = {"kind": "classification", "records": CLASSIFICATION_ROWS}
    resp = client.post("/v1/datasets", content=json.dumps(body).encode(), headers=auth)
    assert resp.status_code == 200, resp.text
    assert order == ["healthz", "parsing"]


def test_an_inference_body_is_parsed_off_the_event_loop(
    client: TestClient, auth: Headers, monkeypatch: pytest.MonkeyPatch
) -> None:
    order = _hold_until_answered(client, monkeypatch)
    resp = client.post("/predict?adapter=x", content=b'{"inputs": ["a"]}', headers=auth)
    assert resp.status_code != 422, resp.text  # read, then answered (no adapter here)
    assert order == ["healthz", "parsing"]


def test_a_value_longer_than_any_valid_one_is_refused_unread(
    client: TestClient, auth: Headers
) -> None:
    junk = b"{}, " * (MAX_VALUE_CHARS // 4 + 1)
    body = b'{"inputs": ["a"], "truncate": [' + junk + b"{}]}"
    resp = client.post("/predict?adapter=x", content=body, headers=auth)
    assert_error(resp, 413, param="truncate", code="value_too_large")


# A lone surrogate: valid JSON, but no UTF-8 text (a response, the database) can hold it.
SURROGATE = "\\ud800"
S = f'"{SURROGATE}"'


def _body(obj: Any) -> str:
    """``obj``'s JSON with each string "@" (a key or a value) written as a lone surrogate."""
    return json.dumps(obj).replace('"@"', S)


def _cls(**fields: Any) -> str:
    """A classification body whose first record has ``fields`` added."""
    records = [{"text": "a", "label": "x", **fields}, {"text": "b", "label": "y"}]
    return _body({"kind": "classification", "records": records})


def _pref(**fields: Any) -> str:
    return _body({"kind": "preference", "records": [{"chosen": "a", "rejected": "b", **fields}]})


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (
            _body({"kind": "classification", "name": "@", "records": []}),
            "name",
            "invalid_name",
        ),
        (f'{{"kind": {S}, "records": []}}', "kind", "invalid_kind"),
        (f'{{{S}: 1, "kind": "classification"}}', None, "json_invalid"),
        (f'{{"kind": "classification", {S}: 1}}', None, "json_invalid"),
        (_cls(text="@"), "records.0.text", "invalid_unicode"),
        (_cls(label="@"), "records.0.label", "invalid_unicode"),
        (_cls(text_pair="@"), "records.0.text_pair", "invalid_unicode"),
        (
            _body({"records": [{"text": "@", "label": "x"}], "kind": "classification"}),
            "records.0.text",
            "invalid_unicode",
        ),
        (_pref(chosen="@"), "records.0.chosen", "invalid_unicode"),
        (_pref(rejected="@"), "records.0.rejected", "invalid_unicode"),
        (_pref(prompt="@"), "records.0.prompt", "invalid_unicode"),
    ],
    ids=[
        "name",
        "kind",
        "first-key",
        "key",
        "text",
        "label",
        "text_pair",
        "held-text",
        "chosen",
        "rejected",
        "prompt",
    ],
)
def test_a_lone_surrogate_in_a_dataset_body_is_a_422_and_nothing_is_stored(
    client: TestClient, auth: Headers, body: str, param: str | None, code: str
) -> None:
    assert_error(
        client.post("/v1/datasets", content=body.encode(), headers=auth),
        422,
        param=param,
        code=code,
    )
    assert client.get("/v1/datasets", headers=auth).json()["data"] == []
    # The dry run: the same refusal, or a report naming the row's field.
    resp = client.post("/v1/datasets/validate", content=body.encode(), headers=auth)
    if resp.status_code == 200:
        problem = resp.json()["errors"][0]
        assert (problem["param"], problem["code"]) == (param, code)
    else:
        assert_error(resp, 422, param=param, code=code)


def test_a_lone_surrogate_in_a_dropped_record_field_is_dropped_with_it(
    client: TestClient, auth: Headers
) -> None:
    # As in a file's rows: fields other than the kind's are not read, so not refused.
    for extra in ({"meta": {"k": "@"}}, {"@": "1"}, {"ids": ["@"]}):
        resp = client.post("/v1/datasets", content=_cls(**extra).encode(), headers=auth)
        assert resp.status_code == 200, resp.text
        rows = client.get(f"/v1/files/{resp.json()['id']}/content", headers=auth)
        assert rows.text.splitlines() == [
            '{"text": "a", "label": "x"}',
            '{"text": "b", "label": "y"}',
        ]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/predict?adapter=x", f'{{{S}: 1, "inputs": ["a"]}}'),
        ("/predict?adapter=x", f'{{"inputs": ["a"], {S}: 1}}'),
        ("/predict?adapter=x", f'{{"inputs": [{S}]}}'),
        ("/predict?adapter=x", f'{{"inputs": [["a", {S}]]}}'),
        ("/predict?adapter=x", f'{{"inputs": [{{"text": {S}}}]}}'),
        ("/predict?adapter=x", f'{{"inputs": [{{"text": "a", "text_pair": {S}}}]}}'),
        ("/predict?adapter=x", f'{{"inputs": [{{"text": "a", {S}: "b"}}]}}'),
        ("/reward/compare?adapter=x", f'{{{S}: 1, "response_a": "a", "response_b": "b"}}'),
        ("/reward/compare?adapter=x", f'{{"prompt": {S}, "response_a": "a", "response_b": "b"}}'),
        ("/reward/compare?adapter=x", f'{{"response_a": {S}, "response_b": "b"}}'),
        ("/reward/compare?adapter=x", f'{{"pairs": [{{"response_a": "a", "response_b": {S}}}]}}'),
        (
            "/reward/compare?adapter=x",
            f'{{"pairs": [{{"prompt": {S}, "response_a": "a", "response_b": "b"}}]}}',
        ),
        (
            "/reward/compare?adapter=x",
            f'{{"pairs": [{{{S}: "c", "response_a": "a", "response_b": "b"}}]}}',
        ),
    ],
)
def test_a_lone_surrogate_in_an_inference_body_is_a_422(
    client: TestClient, auth: Headers, path: str, body: str
) -> None:
    error = assert_error(client.post(path, content=body.encode(), headers=auth), 422)
    if error["code"] == "json_invalid":  # a key: named by its position
        assert "Property name is not valid Unicode" in error["message"], error
        assert "line 1 column" in error["message"], error


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_json_body_sent_as_another_type_is_415_saying_so(
    client: TestClient, auth: Headers, content_type: str
) -> None:
    """It was a 422 "Input should be a valid dictionary" naming no field (curl's -d alone
    sends a form type)."""
    for path, sent in (
        ("/predict?adapter=x", {"inputs": ["fine"]}),  # a body read off the event loop
        ("/v1/fine_tuning/jobs", {"training_file": "file-x"}),  # one FastAPI reads
    ):
        headers = {**auth, "Content-Type": content_type}
        resp = client.post(path, content=json.dumps(sent), headers=headers)
        error = assert_error(resp, 415, code="unsupported_media_type")
        assert "application/json" in error["message"] and content_type in error["message"]
        # The key is still checked first.
        headers = {"Content-Type": content_type}
        assert client.post(path, content=json.dumps(sent), headers=headers).status_code == 401
