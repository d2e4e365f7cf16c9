"""``POST /v1/datasets/validate``: the upload's checks as a dry run, every problem listed.

The dashboard checks a dropped file with this route before it offers to upload it, so the
verdict must be the upload's own: for every file the dry run is valid exactly when the upload
is accepted, reports the same rows and label counts when it is, and, when it is not, lists
first the very problem (message, field, code) the upload answers with, then the later ones,
each with its line. Nothing is ever stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.datasets.validation import MAX_PROBLEMS
from tests.service.conftest import make_settings
from tests.service.helpers import ADMIN_KEY, Headers, assert_error, upload

MAX_ROWS = 300
MB = 1024 * 1024


@pytest.fixture
def settings(tmp_path: Path, db_backend: str, database_url: str) -> Settings:
    # Small bounds, to check that the dry run is bounded as the upload is.
    url = database_url if db_backend == "postgres" else None
    return make_settings(
        tmp_path, admin_key=ADMIN_KEY, database_url=url, max_upload_mb=1, max_dataset_rows=MAX_ROWS
    )


def _j(*rows: Any) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


# (file name, kind, content, lines the dry run must flag: [] for a valid file)
CASES: list[tuple[str, str, bytes, list[int | None]]] = [
    ("ok.jsonl", "classification", _j({"text": "a", "label": 1}, {"text": "b", "label": "0"}), []),
    (
        "pair.jsonl",
        "classification",
        _j(
            {"text": "a", "text_pair": "", "label": "x"},
            {"text": "b", "text_pair": "c", "label": "y"},
        ),
        [],
    ),
    (
        "blank-lines.jsonl",
        "classification",
        _j({"text": "a", "label": "x"}, "", "  ", {"text": "b", "label": "y"}, "{oops"),
        [5],
    ),
    (
        "bad-json.jsonl",
        "classification",
        _j({"text": "a", "label": "x"}, {"text": "b", "label": "y"}, '{"text": "c",'),
        [3],
    ),
    ("array.jsonl", "classification", _j({"text": "a", "label": "x"}, "[1, 2]"), [2]),
    ("no-label.jsonl", "classification", _j({"text": "a", "label": "x"}, {"text": "b"}), [2]),
    ("empty-text.jsonl", "classification", _j({"text": "  ", "label": "x"}), [1]),
    ("bool-label.jsonl", "classification", _j({"text": "a", "label": True}), [1]),
    ("float-label.jsonl", "classification", _j({"text": "a", "label": 1.5}), [1]),
    ("number-text.jsonl", "classification", _j({"text": 3, "label": "x"}), [1]),
    (
        "one-class.jsonl",
        "classification",
        _j({"text": "a", "label": "x"}, {"text": "b", "label": "x"}),
        [None],  # a problem of the whole dataset: no line
    ),
    ("empty.jsonl", "classification", b"\n\n", [None]),
    ("prefs.jsonl", "preference", _j({"prompt": "p", "chosen": "a", "rejected": "b"}), []),
    (
        "same.jsonl",
        "preference",
        _j({"chosen": "a", "rejected": "b"}, {"chosen": "c", "rejected": "c"}),
        [2],
    ),
    ("no-rejected.jsonl", "preference", _j({"chosen": "a"}), [1]),
    (
        "ok.csv",
        "classification",
        b'text,label\n"a, with comma",x\n"multi\nline ""quoted""",y\n',
        [],
    ),
    ("crlf-bom.csv", "classification", "\ufefftext,label\r\nfine,x\r\nbad,y\r\n".encode(), []),
    ("no-column.csv", "classification", b"text,category\na,x\n", [1]),
    ("short-row.csv", "classification", b"text,label\na,x\nb\nc,y\nd\n", [3, 5]),
    ("multiline-then-bad.csv", "classification", b'text,label\n"one\ntwo",x\nshort\n', [4]),
    ("unterminated.csv", "classification", b'text,label\na,x\n"open,y\n', [3]),
    ("prefs.csv", "preference", b"prompt,chosen,rejected\np,a,b\np,c,d\n", []),
    (
        "bad-utf8.jsonl",
        "classification",
        b'{"text": "a", "label": "x"}\n{"text": "\xff", "label": "y"}\n',
        [2],
    ),
]


def _dry_run(client: TestClient, auth: Headers, name: str, data: bytes, kind: str | None) -> Any:
    form = {"kind": kind} if kind else {}
    resp = client.post(
        "/v1/datasets/validate", headers=auth, data=form, files={"file": (name, data)}
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def _stored(client: TestClient, auth: Headers) -> int:
    return len(client.get("/v1/datasets", headers=auth).json()["data"])


@pytest.mark.parametrize(("name", "kind", "data", "lines"), CASES, ids=[c[0] for c in CASES])
def test_dry_run_agrees_with_the_upload(
    client: TestClient,
    auth: Headers,
    name: str,
    kind: str,
    data: bytes,
    lines: list[int | None],
) -> None:
    report = _dry_run(client, auth, name, data, kind)
    assert _stored(client, auth) == 0, "a dry run stored something"
    assert report["object"] == "dataset.validation" and report["kind"] == kind
    assert report["format"] == ("csv" if name.endswith(".csv") else "jsonl")
    assert [e["line"] for e in report["errors"]] == lines, report["errors"]
    assert report["valid"] is (not lines)
    assert report["truncated"] is False

    stored = upload(client, auth, data, kind=kind, filename=name)
    if report["valid"]:
        assert stored.status_code == 200, stored.text
        assert report["row_count"] == stored.json()["row_count"]
        assert report["label_counts"] == stored.json()["label_counts"]
        return
    first = report["errors"][0]
    error = assert_error(stored, 422, code=first["code"], param=first["param"])
    assert error["message"] == first["message"]
    for problem in report["errors"]:
        if problem["line"] is not None:  # the message names the line, as the upload's does
            assert problem["message"].startswith(f"line {problem['line']}: "), problem


def test_every_bad_line_is_listed_with_its_field(client: TestClient, auth: Headers) -> None:
    data = _j(
        {"text": "a", "label": "x"},
        "{bad",
        {"text": "", "label": "y"},
        {"text": "c"},
        {"text": "d", "label": "y"},
    )
    report = _dry_run(client, auth, "f.jsonl", data, "classification")
    assert [(e["line"], e["param"], e["code"]) for e in report["errors"]] == [
        (2, "file", "invalid_json"),
        (3, "text", "empty_field"),
        (4, "label", "missing_field"),
    ]
    assert report["errors"][1]["message"] == "line 3: field 'text' must not be empty"
    # The good rows are still counted: what the file would hold once fixed.
    assert report["row_count"] == 2 and report["label_counts"] == {"x": 1, "y": 1}


def test_kind_is_inferred_when_not_given(client: TestClient, auth: Headers) -> None:
    prefs = _dry_run(client, auth, "p.jsonl", _j({"chosen": "a", "rejected": "b"}), None)
    assert prefs["valid"] and prefs["kind"] == "preference" and prefs["label_counts"] is None
    csv = _dry_run(client, auth, "c.csv", b"text,label\na,x\nb,y\n", None)
    assert csv["valid"] and csv["kind"] == "classification" and csv["row_count"] == 2
    unknown = _dry_run(client, auth, "u.csv", b"question,answer\na,b\n", None)
    assert not unknown["valid"] and unknown["kind"] is None
    [problem] = unknown["errors"]
    assert problem["param"] == "kind" and problem["code"] == "unknown_dataset_kind"
    assert problem["line"] == 1
    assert "'answer', 'question'" in problem["message"]


def test_json_records_are_checked_by_index(client: TestClient, auth: Headers) -> None:
    body = {"kind": "preference", "records": [{"chosen": "a", "rejected": "b"}, 3, {"chosen": "c"}]}
    resp = client.post("/v1/datasets/validate", headers=auth, json=body)
    assert resp.status_code == 200, resp.text
    report = resp.json()
    assert report["format"] is None and report["row_count"] == 1
    assert [(e["line"], e["param"]) for e in report["errors"]] == [
        (None, "records.1"),
        (None, "records.2.rejected"),
    ]
    assert report["errors"][0]["message"] == "records[1]: expected an object, got integer"
    assert_error(client.post("/v1/datasets", headers=auth, json=body), 422, param="records.1")
    assert _stored(client, auth) == 0


def test_listing_stops_at_a_bound(client: TestClient, auth: Headers) -> None:
    # Every line bad: the first ones are listed, and the report says more may follow.
    data = b"{oops\n" * (MAX_PROBLEMS + 50)
    report = _dry_run(client, auth, "bad.jsonl", data, "classification")
    assert not report["valid"] and report["truncated"] is True
    assert [e["line"] for e in report["errors"]] == list(range(1, MAX_PROBLEMS + 1))


def test_bounded_like_the_upload(client: TestClient, auth: Headers) -> None:
    rows = [{"text": f"t{i}", "label": str(i % 2)} for i in range(MAX_ROWS + 1)]
    report = _dry_run(client, auth, "big.jsonl", _j(*rows), "classification")
    [problem] = report["errors"]
    assert problem["code"] == "too_many_rows" and str(MAX_ROWS) in problem["message"]

    too_big = b'{"text": "a", "label": "b"}\n' * (MB // 28 + 100)
    resp = client.post(
        "/v1/datasets/validate", headers=auth, files={"file": ("big.jsonl", too_big)}
    )
    assert_error(resp, 413, param="file")
    assert _stored(client, auth) == 0


def test_malformed_requests_are_refused_as_the_upload_refuses_them(
    client: TestClient, auth: Headers
) -> None:
    url = "/v1/datasets/validate"
    assert_error(
        client.post(url, headers=auth, data={"kind": "classification"}, files={"x": ("a", b"")}),
        422,
        code="missing_file",
        param="file",
    )
    bad_kind = client.post(url, headers=auth, data={"kind": "poems"}, files={"file": ("a", b"x")})
    assert_error(bad_kind, 422, code="invalid_kind", param="kind")
    plain = client.post(url, headers=auth | {"Content-Type": "text/plain"}, content=b"text")
    assert_error(plain, 415)
    assert_error(client.post(url, files={"file": ("a.jsonl", b"{}")}), 401)
