"""``/v1/datasets`` over HTTP: uploads, 4xx paths, isolation, pagination."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from service.datasets import codec
from service.db.models import Dataset
from service.state import app_state
from service.storage_quota import format_bytes
from tests.service.helpers import (
    CLASSIFICATION_ROWS,
    Headers,
    assert_error,
    create_dataset,
    job_body,
    jsonl,
    sqlite_db_bytes,
    upload,
)


def test_upload_jsonl(client: TestClient, auth: Headers, db: sessionmaker[Session]) -> None:
    data = jsonl(CLASSIFICATION_ROWS)
    resp = upload(client, auth, data, name="reviews")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"].startswith("file-")
    assert body["object"] == "dataset"
    assert body["kind"] == "classification"
    assert body["name"] == "reviews"
    assert body["row_count"] == 4
    assert body["label_counts"] == {"neg": 2, "pos": 2}
    assert body["bytes"] == len(data)
    assert isinstance(body["created_at"], int)
    with db() as session:
        row = session.scalars(select(Dataset)).one()
        assert codec.decode_rows(row.rows, row.rows_encoding) == CLASSIFICATION_ROWS


def test_upload_csv_named_after_the_file(client: TestClient, auth: Headers) -> None:
    resp = upload(client, auth, b"text,label\ngreat,1\nawful,0\n", filename="reviews.csv")
    assert resp.status_code == 200, resp.text
    assert resp.json()["name"] == "reviews.csv"
    assert resp.json()["label_counts"] == {"0": 1, "1": 1}


def test_upload_preference(client: TestClient, auth: Headers) -> None:
    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad"}]
    resp = upload(client, auth, jsonl(rows), kind="preference")
    assert resp.status_code == 200, resp.text
    assert resp.json()["label_counts"] is None and resp.json()["kind"] == "preference"


def test_create_from_json_records(client: TestClient, auth: Headers) -> None:
    body = {"kind": "classification", "name": "inline", "records": CLASSIFICATION_ROWS}
    resp = client.post("/v1/datasets", json=body, headers=auth)
    assert resp.status_code == 200, resp.text
    assert resp.json()["row_count"] == 4 and resp.json()["name"] == "inline"


def test_json_records_bad_row_has_dotted_param(client: TestClient, auth: Headers) -> None:
    records = [*CLASSIFICATION_ROWS, {"text": "x", "label": None}]
    resp = client.post(
        "/v1/datasets", json={"kind": "classification", "records": records}, headers=auth
    )
    assert_error(resp, 422, param="records.4.label", code="missing_field", contains="records[4]")


def test_json_body_shape_errors(client: TestClient, auth: Headers) -> None:
    resp = client.post("/v1/datasets", json={"kind": "regression", "records": []}, headers=auth)
    assert_error(resp, 422, param="kind")
    resp = client.post("/v1/datasets", json={"kind": "classification"}, headers=auth)
    assert_error(resp, 422, param="records", code="missing")


def test_malformed_jsonl_names_the_line(client: TestClient, auth: Headers) -> None:
    data = jsonl(CLASSIFICATION_ROWS) + b'{"text": "broken", "label": \n'
    error = assert_error(upload(client, auth, data), 422, code="invalid_json", param="file")
    assert error["message"].startswith("line 5: invalid JSON")


def test_missing_text_names_line_and_field(client: TestClient, auth: Headers) -> None:
    data = jsonl([*CLASSIFICATION_ROWS[:2], {"label": "pos"}])
    error = assert_error(upload(client, auth, data), 422, param="text", code="missing_field")
    assert error["message"].startswith("line 3:")


def test_csv_bad_row(client: TestClient, auth: Headers) -> None:
    data = b"text,label\ngreat,pos\nawful,neg,extra\n"
    error = assert_error(upload(client, auth, data, filename="d.csv"), 422, code="invalid_csv")
    assert error["message"].startswith("line 3:")


def test_invalid_utf8(client: TestClient, auth: Headers) -> None:
    data = b'{"text": "a", "label": "x"}\n{"text": "\xff\xfe", "label": "y"}\n'
    error = assert_error(upload(client, auth, data), 422, code="invalid_utf8")
    assert error["message"].startswith("line 2:")


def test_one_class(client: TestClient, auth: Headers) -> None:
    data = jsonl([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    assert_error(upload(client, auth, data), 422, code="single_class", param="label")


def test_empty_file(client: TestClient, auth: Headers) -> None:
    assert_error(upload(client, auth, b""), 422, code="empty_file", param="file")


def test_missing_file_field_and_bad_kind(client: TestClient, auth: Headers) -> None:
    resp = client.post(
        "/v1/datasets", data={"kind": "classification"}, headers=auth, files={"other": ("x", b"y")}
    )
    assert_error(resp, 422, param="file", code="missing_file")
    assert_error(upload(client, auth, jsonl(CLASSIFICATION_ROWS), kind="nope"), 422, param="kind")


def test_unsupported_content_type(client: TestClient, auth: Headers) -> None:
    resp = client.post(
        "/v1/datasets", content=b"text", headers=auth | {"Content-Type": "text/plain"}
    )
    assert_error(resp, 415, code="unsupported_media_type")


def test_row_limit_from_settings(client: TestClient, auth: Headers) -> None:
    app_state(client.app).settings.max_dataset_rows = 3
    assert_error(upload(client, auth, jsonl(CLASSIFICATION_ROWS)), 422, code="too_many_rows")


def test_rejected_upload_stores_nothing(client: TestClient, auth: Headers) -> None:
    upload(client, auth, jsonl(CLASSIFICATION_ROWS) + b"{not json}\n")
    assert client.get("/v1/datasets", headers=auth).json()["data"] == []


def test_dataset_byte_quota_is_429_with_the_usage(
    client: TestClient, auth: Headers, other_auth: Headers
) -> None:
    data = jsonl(CLASSIFICATION_ROWS)
    app_state(client.app).settings.max_dataset_bytes_per_tenant = 2 * len(data)
    first = create_dataset(client, auth)
    create_dataset(client, auth)  # exactly at the limit: accepted
    resp = upload(client, auth, data)
    error = assert_error(resp, 429, code="dataset_bytes_limit", type="rate_limit_error")
    assert resp.headers["x-should-retry"] == "false"
    used = format_bytes(2 * len(data))
    assert f"use {used} of {used}; this one adds {format_bytes(len(data))}" in error["message"]
    assert len(client.get("/v1/datasets", headers=auth).json()["data"]) == 2
    # Per tenant: another tenant's uploads are not counted.
    assert upload(client, other_auth, data).status_code == 200
    # A delete gives the bytes back.
    assert client.delete(f"/v1/datasets/{first}", headers=auth).status_code == 200
    assert upload(client, auth, data).status_code == 200


@pytest.mark.sqlite_only
def test_deleting_a_dataset_shrinks_the_sqlite_file(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    dataset_id = create_dataset(client, auth)
    blob = os.urandom(4 << 20)  # incompressible, like a large upload's gzip'd rows
    with db() as session:
        session.get(Dataset, dataset_id).rows = blob  # type: ignore[union-attr]
        session.commit()
    with db() as session:
        assert session.execute(text("PRAGMA auto_vacuum")).scalar_one() == 2  # incremental
    grown = sqlite_db_bytes(db)
    assert client.delete(f"/v1/datasets/{dataset_id}", headers=auth).status_code == 200
    assert sqlite_db_bytes(db) < grown - len(blob) // 2


def test_get_and_delete(client: TestClient, auth: Headers) -> None:
    dataset_id = create_dataset(client, auth)
    got = client.get(f"/v1/datasets/{dataset_id}", headers=auth).json()
    assert got["id"] == dataset_id and got["row_count"] == 4
    resp = client.delete(f"/v1/datasets/{dataset_id}", headers=auth)
    assert resp.json() == {"id": dataset_id, "object": "dataset", "deleted": True}
    assert_error(
        client.get(f"/v1/datasets/{dataset_id}", headers=auth), 404, code="dataset_not_found"
    )


def test_unknown_dataset_is_404(client: TestClient, auth: Headers) -> None:
    assert_error(
        client.get("/v1/datasets/file-missing", headers=auth),
        404,
        code="dataset_not_found",
        type="not_found_error",
    )
    assert_error(client.delete("/v1/datasets/file-missing", headers=auth), 404)


def test_other_tenants_dataset_is_404_never_403(
    client: TestClient, auth: Headers, other_auth: Headers
) -> None:
    dataset_id = create_dataset(client, auth)
    assert_error(client.get(f"/v1/datasets/{dataset_id}", headers=other_auth), 404)
    assert_error(client.delete(f"/v1/datasets/{dataset_id}", headers=other_auth), 404)
    assert client.get("/v1/datasets", headers=other_auth).json()["data"] == []
    # Still there for its owner.
    assert client.get(f"/v1/datasets/{dataset_id}", headers=auth).status_code == 200


def test_dataset_used_by_active_job_cannot_be_deleted(client: TestClient, auth: Headers) -> None:
    dataset_id = create_dataset(client, auth)
    job = client.post("/v1/fine_tuning/jobs", json=job_body(dataset_id), headers=auth).json()
    assert_error(
        client.delete(f"/v1/datasets/{dataset_id}", headers=auth), 409, code="dataset_in_use"
    )
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth)
    assert client.delete(f"/v1/datasets/{dataset_id}", headers=auth).status_code == 200


def test_cursor_pagination_newest_first(client: TestClient, auth: Headers) -> None:
    created = [create_dataset(client, auth) for _ in range(5)]
    newest_first = list(reversed(created))

    page1 = client.get("/v1/datasets?limit=2", headers=auth).json()
    assert page1["object"] == "list" and page1["has_more"] is True
    assert [d["id"] for d in page1["data"]] == newest_first[:2]
    assert page1["last_id"] == newest_first[1]

    page2 = client.get(f"/v1/datasets?limit=2&after={page1['last_id']}", headers=auth).json()
    assert [d["id"] for d in page2["data"]] == newest_first[2:4] and page2["has_more"] is True

    page3 = client.get(f"/v1/datasets?limit=2&after={page2['last_id']}", headers=auth).json()
    assert [d["id"] for d in page3["data"]] == newest_first[4:] and page3["has_more"] is False

    assert_error(
        client.get("/v1/datasets?after=file-unknown", headers=auth),
        422,
        param="after",
        code="invalid_cursor",
    )
