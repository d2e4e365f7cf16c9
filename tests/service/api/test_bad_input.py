"""Every named bad input of the issue, one test each: a clear 4xx in the standard error shape.

Each test asserts the status *and* what the error body names (``param``, ``code``, and where
the message says which line or field). Deeper variations of several cases live next to the
code they exercise (``test_dataset_validation``, ``test_adapter_transfer``,
``test_method_validation``, ``test_body_limit``); this file is the checklist.

The app runs with its serving hook on the tiny random base (``serving_client``), so the
routes that need the encoder (predict, adapter import) answer for real.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.state import app_state
from tests.core.inference.helpers import lora
from tests.service.helpers import (
    CLASSIFICATION_ROWS,
    Headers,
    assert_error,
    create_dataset,
    job_body,
    jsonl,
    store_adapter,
    upload,
    zip_bytes,
)

JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture
def c(serving_client: TestClient) -> TestClient:
    return serving_client


def _import(c: TestClient, auth: Headers, data: bytes, **fields: Any) -> Any:
    form = {"name": "imported", "task": "classification", "label_names": "neg,pos", **fields}
    return c.post(
        "/v1/adapters/import",
        headers=auth,
        data=form,
        files={"file": ("adapter.zip", data, "application/zip")},
    )


PEFT_CONFIG = json.dumps(
    {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"]}
).encode()


# --- datasets --------------------------------------------------------------------------------


def test_malformed_jsonl_names_the_row(c: TestClient, auth: Headers) -> None:
    data = jsonl(CLASSIFICATION_ROWS[:2]) + b'{"text": "cut off", "label"\n'
    error = assert_error(upload(c, auth, data), 422, param="file", code="invalid_json")
    assert error["message"].startswith("line 3:")


@pytest.mark.parametrize("route", ["/v1/datasets", "/v1/files"])
def test_deeply_nested_json_row_is_malformed_not_a_crash(
    c: TestClient, auth: Headers, route: str
) -> None:
    # json.loads raises RecursionError (not ValueError) past ~1000 levels: this was a 500 on
    # /v1/files, whose kind inference read the first row without catching it.
    data = jsonl(CLASSIFICATION_ROWS[:1]) + b"[" * 100_000 + b"]" * 100_000 + b"\n"
    form = {"kind": "classification"} if route == "/v1/datasets" else {"purpose": "fine-tune"}
    resp = c.post(route, headers=auth, data=form, files={"file": ("d.jsonl", data)})
    error = assert_error(resp, 422, param="file", code="invalid_json")
    assert error["message"].startswith("line 2:")
    resp = c.post(route, headers=auth, data=form, files={"file": ("d.jsonl", data[-200_002:])})
    assert_error(resp, 422, param="file", code="invalid_json")


def test_malformed_csv_names_the_row(c: TestClient, auth: Headers) -> None:
    data = b'text,label\n"fine",pos\n"good",neg\n"unterminated,pos\n'
    error = assert_error(upload(c, auth, data, filename="d.csv"), 422)
    assert "line 4" in error["message"], error


def test_csv_row_with_an_empty_cell_names_row_and_field(c: TestClient, auth: Headers) -> None:
    data = b"text,label\nfine,pos\n,neg\n"
    error = assert_error(upload(c, auth, data, filename="d.csv"), 422, param="text")
    assert error["message"].startswith("line 3:")


@pytest.mark.parametrize(
    ("row", "param", "fragment"),
    [
        ({"text": 5, "label": "pos"}, "text", "must be a string, got integer"),
        ({"text": "ok", "label": [1]}, "label", "got array"),
        ({"text": "ok", "label": True}, "label", "got boolean"),
        ({"text": "ok", "label": "pos", "text_pair": {"a": 1}}, "text_pair", "got object"),
    ],
    ids=["text-int", "label-list", "label-bool", "pair-object"],
)
def test_wrong_types_in_rows(
    c: TestClient, auth: Headers, row: dict[str, Any], param: str, fragment: str
) -> None:
    data = jsonl([*CLASSIFICATION_ROWS, row])
    error = assert_error(upload(c, auth, data), 422, param=param, code="invalid_type")
    assert error["message"].startswith("line 5:") and fragment in error["message"]


def test_wrong_types_in_json_bodies(c: TestClient, auth: Headers) -> None:
    resp = c.post("/v1/datasets", headers=auth, json={"kind": "classification", "records": "x"})
    assert_error(resp, 422, param="records")
    train = create_dataset(c, auth)
    body = job_body(train)
    body["method"]["hyperparameters"] = {"n_epochs": "three"}
    assert_error(
        c.post(JOBS, headers=auth, json=body), 422, param="method.hyperparameters.n_epochs"
    )
    resp = c.post("/predict?adapter=x", headers=auth, json={"inputs": [1, 2]})
    assert_error(resp, 422)
    assert resp.json()["error"]["param"].startswith("inputs.0")


@pytest.mark.parametrize(
    ("item", "param", "says"),
    [
        (5, "inputs.0", "a text, a [text, text_pair] array or a {text, text_pair} object"),
        (None, "inputs.0", "a text, a [text, text_pair] array or a {text, text_pair} object"),
        ("", "inputs.0", "at least 1 character"),
        (["a"], "inputs.0", "at least 2 items"),
        ({"text": "a", "foo": "b"}, "inputs.0.foo", "Extra inputs are not permitted"),
    ],
)
def test_a_bad_predict_input_is_named_by_the_shape_sent(
    c: TestClient, auth: Headers, item: Any, param: str, says: str
) -> None:
    """A plain union answered each with its string branch's complaint
    ("inputs.0.constrained-str", "and 2 more errors"), even for an item meant as a pair."""
    resp = c.post("/predict?adapter=x", headers=auth, json={"inputs": [item]})
    error = assert_error(resp, 422, param=param)
    assert says in error["message"] and "more errors" not in error["message"]


def test_unknown_labels_in_validation_data(c: TestClient, auth: Headers) -> None:
    train = create_dataset(c, auth)
    val = create_dataset(c, auth, [{"text": "meh", "label": "neutral"}, *CLASSIFICATION_ROWS])
    resp = c.post(JOBS, headers=auth, json=job_body(train, validation_file=val))
    error = assert_error(resp, 422, param="validation_file", code="unknown_validation_labels")
    assert "'neutral'" in error["message"]


@pytest.mark.parametrize("data", [b"", b"\n\n  \n"], ids=["empty", "blank-lines"])
def test_empty_dataset(c: TestClient, auth: Headers, data: bytes) -> None:
    error = assert_error(upload(c, auth, data), 422, param="file")
    assert "no rows" in error["message"] or "empty" in error["message"]


def test_csv_with_only_a_header_is_empty(c: TestClient, auth: Headers) -> None:
    error = assert_error(upload(c, auth, b"text,label\n", filename="d.csv"), 422, param="file")
    assert "no rows" in error["message"] or "empty" in error["message"]


def test_one_class_dataset(c: TestClient, auth: Headers) -> None:
    rows = [{"text": f"t{i}", "label": "pos"} for i in range(5)]
    error = assert_error(upload(c, auth, jsonl(rows)), 422, param="label", code="single_class")
    assert "at least 2 classes" in error["message"] and "'pos'" in error["message"]


def test_invalid_unicode_names_the_row(c: TestClient, auth: Headers) -> None:
    data = jsonl(CLASSIFICATION_ROWS) + b'{"text": "caf\xe9", "label": "pos"}\n'
    error = assert_error(upload(c, auth, data), 422, param="file")
    assert error["message"].startswith("line 5:") and "UTF-8" in error["message"]


def test_lone_surrogate_in_a_jsonl_row_names_the_row(c: TestClient, auth: Headers) -> None:
    # Valid JSON, invalid Unicode: "\ud800" parses to a lone surrogate no UTF-8 store can hold
    # (this was a 500: the dataset codec failed to encode it).
    data = jsonl(CLASSIFICATION_ROWS) + b'{"text": "bad \\ud800 text", "label": "pos"}\n'
    error = assert_error(upload(c, auth, data), 422, param="text", code="invalid_unicode")
    assert error["message"].startswith("line 5:")
    data = jsonl(CLASSIFICATION_ROWS) + b'{"text": "fine", "label": "\\udfff"}\n'
    assert_error(upload(c, auth, data), 422, param="label", code="invalid_unicode")


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("POST", "/predict?adapter=clf", '{"inputs": ["bad \\ud800"]}'),
        ("POST", "/v1/fine_tuning/jobs", '{"training_file": "file-\\ud800"}'),
        ("POST", "/v1/datasets", '{"kind": "classification", "records": [{"text": "\\ud800"}]}'),
    ],
    ids=["predict", "job", "dataset-records"],
)
def test_lone_surrogates_in_json_bodies_are_4xx(
    c: TestClient, auth: Headers, method: str, url: str, body: str
) -> None:
    store_adapter(c, auth, "clf", lora(app_state(c.app).require_base_model(), r=2, seed=1))
    resp = c.request(method, url, headers=auth | {"Content-Type": "application/json"}, content=body)
    assert 400 <= resp.status_code < 500, resp.text
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


# --- texts beyond the model's window ---------------------------------------------------------


def test_texts_beyond_max_length_are_truncated_by_default_and_refused_on_request(
    c: TestClient, auth: Headers
) -> None:
    store_adapter(c, auth, "clf", lora(app_state(c.app).require_base_model(), r=2, seed=1))
    long_text = "word " * 5000
    ok = c.post("/predict?adapter=clf", headers=auth, json={"inputs": ["short", long_text]})
    assert ok.status_code == 200, ok.text
    refused = c.post(
        "/predict?adapter=clf",
        headers=auth,
        json={"inputs": ["short", long_text], "truncate": False},
    )
    error = assert_error(refused, 422, param="inputs.1", code="input_too_long")
    assert "truncate" in error["message"]
    # Training data: a long text is accepted (training truncates to max_seq_length).
    rows = [{"text": long_text, "label": "pos"}, {"text": "short", "label": "neg"}]
    assert upload(c, auth, jsonl(rows)).status_code == 200
    # Beyond any sense (100 000 characters) it is refused, naming the row and field.
    rows[0]["text"] = "x" * 100_001
    error = assert_error(upload(c, auth, jsonl(rows)), 422, param="text", code="field_too_long")
    assert error["message"].startswith("line 1:")


# --- hyperparameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "param"),
    [
        ({"type": "lora", "lora": {"r": 0}}, "method.lora.r"),
        (
            {"type": "lora", "hyperparameters": {"learning_rate": -1e-3}},
            "method.hyperparameters.learning_rate",
        ),
        ({"type": "lora", "lora": {"target_modules": ["q_proj"]}}, "method.lora.target_modules"),
        (
            {"type": "lora", "hyperparameters": {"batch_size": 0}},
            "method.hyperparameters.batch_size",
        ),
        ({"type": "lora", "lora": {"dropout": 1.5}}, "method.lora.dropout"),
    ],
    ids=["r=0", "negative-lr", "unknown-target-module", "batch-size-0", "dropout>1"],
)
def test_invalid_hyperparameters(
    c: TestClient, auth: Headers, method: dict[str, Any], param: str
) -> None:
    train = create_dataset(c, auth)
    resp = c.post(JOBS, headers=auth, json={"training_file": train, "method": method})
    error = assert_error(resp, 422, param=param)
    assert param.removeprefix("method.") in error["message"] or param in error["message"]
    assert c.get(JOBS, headers=auth).json()["data"] == [], "a refused job leaves nothing behind"


# --- adapter archives ------------------------------------------------------------------------


def test_adapter_zip_with_a_pickle_bin(c: TestClient, auth: Headers) -> None:
    data = zip_bytes({"adapter_config.json": PEFT_CONFIG, "adapter_model.bin": b"\x80\x04K\x01."})
    error = assert_error(_import(c, auth, data), 422, param="file", code="pickle_refused")
    assert "pickle" in error["message"]


def test_zip_bomb(c: TestClient, auth: Headers) -> None:
    data = zip_bytes(
        {"adapter_config.json": PEFT_CONFIG, "adapter_model.safetensors": bytes(64 << 20)}
    )
    assert len(data) < 1 << 20
    error = assert_error(_import(c, auth, data), 422, param="file")
    assert error["code"] in ("suspicious_compression", "archive_too_large")


@pytest.mark.parametrize(
    "member", ["../adapter_config.json", "a/../../adapter_config.json", "/etc/adapter_config.json"]
)
def test_path_traversal_in_an_imported_zip(c: TestClient, auth: Headers, member: str) -> None:
    data = zip_bytes({member: PEFT_CONFIG})
    assert_error(_import(c, auth, data), 422, param="file", code="unsafe_path")


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("files", "fields"),
    [
        ({"adapter_config.json": DEEP, "adapter_model.safetensors": b"x"}, {}),
        ({"adapter_config.json": DEEP, "adapter_model.safetensors": b"x"}, {"task": ""}),
        ({"loraplex_adapter.json": DEEP, "loraplex_adapter.safetensors": b"x"}, {"task": ""}),
        ({"adapter_config.json": PEFT_CONFIG}, {"label_names": DEEP.decode()}),
    ],
    ids=["peft-config", "peft-config-no-head", "loraplex-config", "label-names-field"],
)
def test_deeply_nested_json_in_an_import_is_422(
    c: TestClient, auth: Headers, files: dict[str, bytes], fields: dict[str, str]
) -> None:
    # json.loads raises RecursionError, not ValueError, on such input: these were 500s.
    resp = _import(c, auth, zip_bytes(files), **fields)
    assert 400 <= resp.status_code < 500, resp.text
    error = assert_error(resp, resp.status_code)
    assert error["param"] in ("file", "label_names", "task")


def test_adapter_for_a_different_base_model(c: TestClient, auth: Headers) -> None:
    store_adapter(c, auth, "src", lora(app_state(c.app).require_base_model(), r=2, seed=2))
    exported = c.get("/v1/adapters/src/export?format=loraplex", headers=auth)
    assert exported.status_code == 200
    with zipfile.ZipFile(io.BytesIO(exported.content)) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    (config_name,) = [n for n in files if n.endswith(".json")]
    config = json.loads(files[config_name])
    config["base_fingerprint"] = "f" * 64
    config["base_model"] = "bert-large-uncased"
    files[config_name] = json.dumps(config).encode()
    resp = _import(c, auth, zip_bytes(files), name="foreign", task="", label_names="")
    assert_error(resp, 422, param="file", code="base_model_mismatch")


# --- sizes and unknown ids -------------------------------------------------------------------


def test_oversized_body_is_413(c: TestClient, auth: Headers) -> None:
    app_state(c.app).settings.max_upload_mb = 1
    # The middleware reads its limit at start-up (51 MB here): a declared size over it...
    resp = c.post(
        "/v1/datasets",
        headers=auth | {"Content-Type": "application/json", "Content-Length": str(200 << 20)},
        content=b"{}",
    )
    assert_error(resp, 413, code="request_too_large")
    # ...and a file over max_upload_mb, named.
    data = b'{"text": "a", "label": "b"}\n' * 40_000
    assert_error(upload(c, auth, data), 413, param="file", code="request_too_large")


@pytest.mark.parametrize(
    ("method", "url", "body", "code"),
    [
        ("POST", "/predict?adapter=nope", {"inputs": ["x"]}, "adapter_not_found"),
        ("POST", "/reward/compare?adapter=nope", {"response_a": "a", "response_b": "b"}, None),
        ("GET", "/v1/adapters/nope", None, "adapter_not_found"),
        ("GET", "/v1/adapters/nope/export", None, "adapter_not_found"),
        ("DELETE", "/v1/adapters/nope", None, "adapter_not_found"),
        ("GET", "/v1/models/nope", None, "model_not_found"),
        ("GET", f"{JOBS}/ftjob-nope", None, "job_not_found"),
        ("GET", f"{JOBS}/ftjob-nope/events", None, "job_not_found"),
        ("GET", f"{JOBS}/ftjob-nope/checkpoints", None, "job_not_found"),
        ("POST", f"{JOBS}/ftjob-nope/cancel", None, "job_not_found"),
        ("GET", "/v1/datasets/file-nope", None, "dataset_not_found"),
        ("GET", "/v1/files/file-nope", None, "file_not_found"),
    ],
)
def test_unknown_adapter_job_or_file_is_404(
    c: TestClient, auth: Headers, method: str, url: str, body: Any, code: str | None
) -> None:
    resp = c.request(method, url, headers=auth, json=body)
    assert_error(resp, 404, code=code, type="not_found_error")
