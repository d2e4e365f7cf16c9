"""413 for bodies over their route's limit, declared or streamed, in the standard error shape:
uploads at max_upload_mb (a JSON dataset exactly, a multipart form with room for its framing),
inference requests at what their largest valid body needs, every other route small."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.schemas.inference import max_body_bytes
from service.main import MULTIPART_OVERHEAD_BYTES, SMALL_BODY_BYTES, body_limits, create_app
from tests.service.conftest import make_settings
from tests.service.helpers import ADMIN_KEY, CLASSIFICATION_ROWS, Headers, assert_error, upload

MB = 1024 * 1024


JSON = {"Content-Type": "application/json"}
# Small enough that a maximal /predict body is cheap to build here.
MAX_REQUEST_CHARS = 1000


@pytest.fixture
def small_client(tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(
        tmp_path, max_upload_mb=1, admin_key=ADMIN_KEY, max_request_chars=MAX_REQUEST_CHARS
    )
    with TestClient(create_app(settings, hooks=[])) as test_client:
        yield test_client


@pytest.fixture
def small_auth(small_client: TestClient, tmp_path: Path) -> Headers:
    return {"Authorization": f"Bearer {(tmp_path / 'default_api_key').read_text().strip()}"}


def padded(body: bytes, size: int) -> bytes:
    """``body`` with whitespace after it (still valid JSON) up to ``size`` bytes."""
    assert len(body) <= size
    return body + b" " * (size - len(body))


def test_declared_content_length_over_limit(small_client: TestClient, small_auth: Headers) -> None:
    body = b"x" * (MB + 1)
    resp = small_client.post("/v1/datasets", content=body, headers=small_auth | JSON)
    assert_error(resp, 413, code="request_too_large", contains="1 MB")


def test_json_upload_exactly_at_the_limit_is_accepted_one_byte_more_is_not(
    small_client: TestClient, small_auth: Headers
) -> None:
    body = json.dumps({"kind": "classification", "records": CLASSIFICATION_ROWS}).encode()
    resp = small_client.post("/v1/datasets", content=padded(body, MB), headers=small_auth | JSON)
    assert resp.status_code == 200, resp.text
    assert resp.json()["bytes"] == MB
    over = padded(body, MB + 1)
    resp = small_client.post("/v1/datasets", content=over, headers=small_auth | JSON)
    assert_error(resp, 413, code="request_too_large", contains="1 MB")
    resp = small_client.post("/v1/datasets/validate", content=over, headers=small_auth | JSON)
    assert_error(resp, 413, code="request_too_large")


def test_inference_bodies_are_capped_at_their_largest_valid_size(
    small_client: TestClient, small_auth: Headers
) -> None:
    cap = max_body_bytes(MAX_REQUEST_CHARS)
    # Every character of a maximal request escaped at its longest fits under the cap.
    pair = {"text": "\U0001f600" * 3, "text_pair": "\U0001f600" * 2}
    maximal = json.dumps({"inputs": [pair] * (MAX_REQUEST_CHARS // 5), "truncate": True}, indent=4)
    assert len(maximal.encode()) <= cap
    for path in ("/predict?adapter=x", "/reward/compare?adapter=x"):
        at_cap = padded(b'{"inputs": ["a"]}', cap)
        resp = small_client.post(path, content=at_cap, headers=small_auth | JSON)
        assert resp.status_code != 413, resp.text
        resp = small_client.post(path, content=at_cap + b" ", headers=small_auth | JSON)
        error = assert_error(resp, 413, code="request_too_large")
        assert f"{cap:,}-byte limit" in error["message"]


def test_other_routes_take_small_bodies(small_client: TestClient, small_auth: Headers) -> None:
    at_cap = padded(b"{}", SMALL_BODY_BYTES)
    resp = small_client.post("/v1/fine_tuning/jobs", content=at_cap, headers=small_auth | JSON)
    assert_error(resp, 422)
    resp = small_client.post(
        "/v1/fine_tuning/jobs", content=at_cap + b" ", headers=small_auth | JSON
    )
    assert_error(resp, 413, code="request_too_large", contains=f"{SMALL_BODY_BYTES // MB} MB")


def test_streamed_body_over_limit_is_cut_off(small_client: TestClient, small_auth: Headers) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        # No Content-Length: the middleware must count as the body arrives.
        nonlocal sent
        for _ in range(64):
            sent += 64 * 1024
            yield b"x" * (64 * 1024)

    resp = small_client.post(
        "/v1/datasets", content=chunks(), headers=small_auth | {"Content-Type": "application/json"}
    )
    assert_error(resp, 413, code="request_too_large")


def test_file_over_max_upload_mb_is_413_naming_the_file(
    small_client: TestClient, small_auth: Headers
) -> None:
    # Under the whole-body allowance (file + multipart overhead) but over the file limit.
    data = b'{"text": "a", "label": "b"}\n' * (MB // 28 + 100)
    assert MB < len(data) < MB + MULTIPART_OVERHEAD_BYTES
    assert_error(upload(small_client, small_auth, data), 413, param="file")
    # Nothing was stored.
    assert small_client.get("/v1/datasets", headers=small_auth).json()["data"] == []


def test_body_under_limit_passes(small_client: TestClient, small_auth: Headers) -> None:
    data = b'{"text": "good", "label": "p"}\n{"text": "bad", "label": "n"}\n'
    assert upload(small_client, small_auth, data).status_code == 200


def test_limits_follow_settings(tmp_path: Path) -> None:
    limits = body_limits(make_settings(tmp_path, max_upload_mb=3, max_request_chars=5000))
    assert limits["/v1/datasets"].max_bytes == 3 * MB
    assert limits["/v1/adapters/import"].multipart_overhead == MULTIPART_OVERHEAD_BYTES
    assert limits["/predict"].max_bytes == max_body_bytes(5000)
