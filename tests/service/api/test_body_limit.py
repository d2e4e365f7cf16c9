"""413 for bodies over the limit, declared or streamed, in the standard error shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.main import MULTIPART_OVERHEAD_BYTES, create_app
from tests.service.conftest import make_settings
from tests.service.helpers import ADMIN_KEY, Headers, assert_error, upload

MB = 1024 * 1024


@pytest.fixture
def small_client(tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, max_upload_mb=1, admin_key=ADMIN_KEY)
    with TestClient(create_app(settings, hooks=[])) as test_client:
        yield test_client


@pytest.fixture
def small_auth(small_client: TestClient, tmp_path: Path) -> Headers:
    return {"Authorization": f"Bearer {(tmp_path / 'default_api_key').read_text().strip()}"}


def test_declared_content_length_over_limit(small_client: TestClient, small_auth: Headers) -> None:
    body = b"x" * (MB + MULTIPART_OVERHEAD_BYTES + 1)
    resp = small_client.post(
        "/v1/datasets", content=body, headers=small_auth | {"Content-Type": "application/json"}
    )
    assert_error(resp, 413, code="request_too_large", contains="1 MB")


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


def test_limit_follows_settings(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, max_upload_mb=3), hooks=[])
    limits = [m.kwargs.get("max_body_bytes") for m in app.user_middleware]
    assert 3 * MB + MULTIPART_OVERHEAD_BYTES in limits
