"""``/v1/files``: OpenAI's Files API over the same records as ``/v1/datasets``."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from service.state import app_state
from tests.service.helpers import (
    CLASSIFICATION_ROWS,
    Headers,
    assert_error,
    create_dataset,
    job_body,
    jsonl,
)

FILES = "/v1/files"
PREFERENCE_ROWS = [
    {"prompt": "q", "chosen": "a good answer", "rejected": "a bad answer"},
    {"chosen": "yes", "rejected": "no"},
]


def _upload(
    client: TestClient,
    headers: Headers,
    data: bytes,
    *,
    filename: str = "train.jsonl",
    purpose: str | None = "fine-tune",
    **fields: str,
) -> httpx.Response:
    form = ({"purpose": purpose} if purpose is not None else {}) | fields
    return client.post(
        FILES, headers=headers, data=form, files={"file": (filename, data, "application/jsonl")}
    )


def test_upload_infers_classification_and_is_openai_shaped(
    client: TestClient, auth: Headers
) -> None:
    resp = _upload(client, auth, jsonl(CLASSIFICATION_ROWS))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"].startswith("file-") and body["object"] == "file"
    assert body["purpose"] == "fine-tune" and body["status"] == "processed"
    assert body["filename"] == "train.jsonl" and body["bytes"] == len(jsonl(CLASSIFICATION_ROWS))
    assert isinstance(body["created_at"], int)
    assert body["kind"] == "classification" and body["row_count"] == 4
    assert body["label_counts"] == {"neg": 2, "pos": 2}


def test_upload_infers_preference_from_rows_and_csv_header(
    client: TestClient, auth: Headers
) -> None:
    body = _upload(client, auth, jsonl(PREFERENCE_ROWS)).json()
    assert body["kind"] == "preference" and body["label_counts"] is None
    csv = b"text,label\nfine,pos\nbad,neg\n"
    body = _upload(client, auth, csv, filename="rows.csv").json()
    assert body["kind"] == "classification" and body["row_count"] == 2


def test_explicit_kind_wins_and_is_validated(client: TestClient, auth: Headers) -> None:
    resp = _upload(client, auth, jsonl(CLASSIFICATION_ROWS), kind="preference")
    # The rows are checked against the kind given: they lack chosen/rejected.
    assert_error(resp, 422, param="chosen", code="missing_field")
    assert_error(_upload(client, auth, b"{}", kind="images"), 422, param="kind")


def test_openai_chat_and_dpo_files_are_inferred(client: TestClient, auth: Headers) -> None:
    chat = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    body = _upload(client, auth, jsonl(chat)).json()
    assert (body["kind"], body["row_count"], body["label_counts"]) == ("chat", 1, None)
    dpo = {
        "input": {"messages": [{"role": "user", "content": "hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
    }
    assert _upload(client, auth, jsonl([dpo])).json()["kind"] == "dpo"
    # A chat row's problem names its line and the message's field.
    no_reply = jsonl([*chat, {"messages": [{"role": "user", "content": "hi"}]}])
    error = assert_error(_upload(client, auth, no_reply), 422, code="no_assistant_message")
    assert error["message"].startswith("line 2:") and error["param"] == "messages"


def test_rows_that_fit_no_kind(client: TestClient, auth: Headers) -> None:
    other = jsonl([{"sentence": "hi", "y": 1}])
    error = assert_error(_upload(client, auth, other), 422, code="unknown_dataset_kind")
    assert "'sentence'" in error["message"] and error["param"] == "kind"


def test_validation_errors_are_the_datasets_ones(client: TestClient, auth: Headers) -> None:
    bad = jsonl(CLASSIFICATION_ROWS) + b'{"text": "x"}\n'
    error = assert_error(_upload(client, auth, bad), 422, param="label", code="missing_field")
    assert error["message"].startswith("line 5:")
    assert_error(_upload(client, auth, b"\n\n"), 422, code="empty_file")


def test_purpose_and_unsupported_fields(client: TestClient, auth: Headers) -> None:
    data = jsonl(CLASSIFICATION_ROWS)
    assert_error(_upload(client, auth, data, purpose=None), 422, param="purpose")
    assert_error(
        _upload(client, auth, data, purpose="assistants"),
        400,
        param="purpose",
        code="unsupported_purpose",
    )
    resp = _upload(client, auth, data, **{"expires_after[anchor]": "created_at"})
    assert_error(resp, 400, param="expires_after", code="unsupported_parameter")
    resp = client.post(FILES, headers=auth, json={"purpose": "fine-tune"})
    assert_error(resp, 415, code="unsupported_media_type")
    resp = client.post(FILES, headers=auth, data={"purpose": "fine-tune"}, files={"x": ("a", b"")})
    assert_error(resp, 422, param="file", code="missing_file")


def test_upload_size_limit_is_413(client: TestClient, auth: Headers) -> None:
    app_state(client.app).settings.max_upload_mb = 1
    big = jsonl([{"text": "x" * 1000, "label": str(i % 2)} for i in range(1200)])
    assert_error(_upload(client, auth, big), 413, code="request_too_large")


def test_files_and_datasets_are_the_same_records(client: TestClient, auth: Headers) -> None:
    dataset_id = create_dataset(client, auth)
    file = client.get(f"{FILES}/{dataset_id}", headers=auth).json()
    assert file["id"] == dataset_id and file["object"] == "file"
    file_id = _upload(client, auth, jsonl(CLASSIFICATION_ROWS)).json()["id"]
    dataset = client.get(f"/v1/datasets/{file_id}", headers=auth).json()
    assert dataset["object"] == "dataset" and dataset["kind"] == "classification"
    # ... and a file trains a job like a dataset does.
    job = client.post("/v1/fine_tuning/jobs", json=job_body(file_id), headers=auth)
    assert job.status_code == 200, job.text


def test_list_pages_both_orders_and_purpose_filter(client: TestClient, auth: Headers) -> None:
    ids = [_upload(client, auth, jsonl(CLASSIFICATION_ROWS)).json()["id"] for _ in range(3)]
    page = client.get(f"{FILES}?limit=2", headers=auth).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [f["id"] for f in page["data"]] == ids[::-1][:2]
    rest = client.get(f"{FILES}?limit=2&after={page['data'][-1]['id']}", headers=auth).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and rest["has_more"] is False
    asc = client.get(f"{FILES}?order=asc&limit=2", headers=auth).json()
    assert [f["id"] for f in asc["data"]] == ids[:2]
    asc2 = client.get(f"{FILES}?order=asc&after={ids[1]}", headers=auth).json()
    assert [f["id"] for f in asc2["data"]] == [ids[2]]
    assert client.get(f"{FILES}?purpose=fine-tune", headers=auth).json()["data"]
    assert client.get(f"{FILES}?purpose=batch", headers=auth).json()["data"] == []


def test_content_returns_normalised_rows(client: TestClient, auth: Headers) -> None:
    rows = [{"text": "fine", "label": 1, "id": 7}, {"text": "bad", "label": 0}]
    file_id = _upload(client, auth, jsonl(rows)).json()["id"]
    resp = client.get(f"{FILES}/{file_id}/content", headers=auth)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/jsonl"
    got = [json.loads(line) for line in resp.text.splitlines()]
    assert got == [{"text": "fine", "label": "1"}, {"text": "bad", "label": "0"}]


def test_a_preference_rows_margin_is_stored_and_returned(client: TestClient, auth: Headers) -> None:
    """A row's own margin wins over the job's (GET /v1/methods): it was dropped on upload."""
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2.5}, PREFERENCE_ROWS[1]]
    csv = b"prompt,chosen,rejected,margin\np,a,b,2.5\n,yes,no,\n"
    for data, filename in [(jsonl(rows), "prefs.jsonl"), (csv, "prefs.csv")]:
        resp = _upload(client, auth, data, filename=filename)
        assert resp.status_code == 200, resp.text
        assert resp.json()["kind"] == "preference"
        content = client.get(f"{FILES}/{resp.json()['id']}/content", headers=auth)
        assert [json.loads(line) for line in content.text.splitlines()] == [
            {"chosen": "a", "rejected": "b", "prompt": "p", "margin": 2.5},
            {"chosen": "yes", "rejected": "no"},
        ]


@pytest.mark.parametrize(
    ("jsonl_value", "csv_cell", "code"),
    [
        ('"big"', "big", "invalid_type"),
        ("true", "true", "invalid_type"),
        ("1e6", "1e6", "out_of_range"),
        ("-1001", "nan", "out_of_range"),
    ],
)
def test_a_bad_margin_is_422_naming_the_line_and_field(
    client: TestClient, auth: Headers, jsonl_value: str, csv_cell: str, code: str
) -> None:
    good = '{"chosen": "a", "rejected": "b", "margin": 1}\n'
    bad = f'{{"chosen": "a", "rejected": "b", "margin": {jsonl_value}}}\n'
    csv = f"chosen,rejected,margin\na,b,1\na,b,{csv_cell}\n"
    for data, filename in [((good + bad).encode(), "p.jsonl"), (csv.encode(), "p.csv")]:
        resp = _upload(client, auth, data, filename=filename)
        error = assert_error(resp, 422, param="margin", code=code)
        assert error["message"].startswith(f"line {3 if filename.endswith('csv') else 2}: ")
        assert "'margin'" in error["message"]
    assert client.get(FILES, headers=auth).json()["data"] == []


def test_delete_and_in_use(client: TestClient, auth: Headers) -> None:
    file_id = _upload(client, auth, jsonl(CLASSIFICATION_ROWS)).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json=job_body(file_id), headers=auth).json()
    assert_error(client.delete(f"{FILES}/{file_id}", headers=auth), 409, code="dataset_in_use")
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth)
    resp = client.delete(f"{FILES}/{file_id}", headers=auth)
    assert resp.status_code == 200
    assert resp.json() == {"id": file_id, "object": "file", "deleted": True}
    assert_error(client.get(f"{FILES}/{file_id}", headers=auth), 404, code="file_not_found")
    assert_error(client.delete(f"{FILES}/{file_id}", headers=auth), 404)


def test_files_are_tenant_isolated(client: TestClient, auth: Headers, other_auth: Headers) -> None:
    mine = _upload(client, auth, jsonl(CLASSIFICATION_ROWS)).json()["id"]
    assert client.get(FILES, headers=other_auth).json()["data"] == []
    assert_error(client.get(f"{FILES}/{mine}", headers=other_auth), 404, code="file_not_found")
    assert_error(client.get(f"{FILES}/{mine}/content", headers=other_auth), 404)
    assert_error(client.delete(f"{FILES}/{mine}", headers=other_auth), 404)
    # Another tenant's id is an unknown cursor, not a page of theirs.
    assert_error(client.get(f"{FILES}?after={mine}", headers=other_auth), 422, param="after")


@pytest.mark.parametrize("path", [FILES, f"{FILES}/file-x", f"{FILES}/file-x/content"])
def test_files_need_a_key(client: TestClient, path: str) -> None:
    assert_error(client.get(path), 401, code="missing_api_key")


def test_file_uploads_count_against_the_dataset_byte_quota(
    client: TestClient, auth: Headers
) -> None:
    data = jsonl(CLASSIFICATION_ROWS)
    app_state(client.app).settings.max_dataset_bytes_per_tenant = len(data)
    assert _upload(client, auth, data).status_code == 200
    assert_error(
        _upload(client, auth, data), 429, code="dataset_bytes_limit", contains="datasets use"
    )
