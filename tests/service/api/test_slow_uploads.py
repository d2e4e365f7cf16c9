"""A client that sends its upload slowly holds no database connection, and no thread, while it
does.

The upload routes read their body themselves, at the client's pace. Their caller was checked by
a dependency whose session, and so its pooled connection, lived as long as the request: a few
dozen clients sending uploads slowly took the whole pool (SQLite's 20 + 10 overflow,
PostgreSQL's 5 + 10), and every other tenant's request waited 30 s for a connection, then
failed. The app runs behind a real uvicorn server; the slow clients are raw sockets that send
the headers and the first part of a multipart body, then nothing.

A JSON upload was parsed in a worker thread as it arrived, so each slow one held one of the
thread pool's 40 tokens: 41 of them stalled every request that needs a thread, ``/healthz``
included. Its body is now received on the event loop first.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from service.state import app_state
from tests.service.helpers import Headers, uvicorn_serving, wait_until

WAIT_S = 20.0  # under the pool's 30 s checkout timeout: a starved request fails the test
BOUNDARY = "slow-upload-boundary"
# Each route's form fields before the file, so the route gets as far as reading the file.
FIELDS = {
    "/v1/datasets": {"kind": "classification"},
    "/v1/datasets/validate": {"kind": "classification"},
    "/v1/files": {"purpose": "fine-tune"},
    "/v1/adapters/import": {"name": "slow"},
}


@pytest.fixture
def port(client: TestClient) -> Iterator[int]:
    with uvicorn_serving(client.app, WAIT_S) as port:
        yield port


@pytest.fixture
def checkouts(client: TestClient) -> Iterator[Callable[[], int]]:
    """How many connections the app's pool has handed out since the fixture started."""
    pool = app_state(client.app).db_engine.pool
    count = 0

    def counted(*_args: object) -> None:
        nonlocal count
        count += 1

    event.listen(pool, "checkout", counted)
    yield lambda: count
    event.remove(pool, "checkout", counted)


def start_slow_upload(port: int, path: str, auth: Headers) -> socket.socket:
    """Send a request's headers and the start of its multipart body (the form fields and the
    file's first row) of a declared 1 MB, and leave it there."""
    parts = "".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in FIELDS[path].items()
    )
    parts += (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="rows.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
        '{"text": "a review", "label": "pos"}\n'
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {auth['Authorization']}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        "Content-Length: 1000000\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall((head + parts).encode())
    return sock


@pytest.mark.parametrize("path", list(FIELDS))
def test_a_slow_upload_holds_no_connection(
    client: TestClient, port: int, auth: Headers, checkouts: Callable[[], int], path: str
) -> None:
    pool = app_state(client.app).db_engine.pool
    uploads = [start_slow_upload(port, path, auth) for _ in range(3)]
    try:
        # Each request's caller is looked up (a connection taken), then its body awaited.
        assert wait_until(lambda: checkouts() >= len(uploads), WAIT_S), f"{checkouts()} checkouts"
        assert wait_until(lambda: pool.checkedout() == 0, WAIT_S), f"{pool.checkedout()} held"
    finally:
        for sock in uploads:
            sock.close()


def test_slow_uploads_past_the_pool_do_not_stall_another_tenant(
    client: TestClient,
    port: int,
    auth: Headers,
    other_auth: Headers,
    checkouts: Callable[[], int],
) -> None:
    # More slow clients than either database's pool holds (SQLite 20 + 10, PostgreSQL 5 + 10).
    uploads = [start_slow_upload(port, "/v1/datasets", auth) for _ in range(32)]
    try:
        # Every slow request gets as far as its body (its caller looked up) first.
        assert wait_until(lambda: checkouts() >= len(uploads), WAIT_S), f"{checkouts()} checkouts"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S) as other:
            resp = other.get("/v1/datasets", headers=other_auth)
            assert resp.status_code == 200, resp.text
            assert resp.json()["data"] == []
            # And the slow clients' own tenant, on a request that is not an upload.
            assert other.get("/v1/datasets", headers=auth).status_code == 200
    finally:
        for sock in uploads:
            sock.close()


def start_slow_json_upload(port: int, path: str, auth: Headers) -> socket.socket:
    """Send a JSON upload's headers and the start of its body of a declared 1 MB."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {auth['Authorization']}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall((head + '{"kind": "classification", "records": [').encode())
    return sock


@pytest.mark.parametrize("path", ["/v1/datasets", "/v1/datasets/validate"])
def test_slow_json_uploads_past_the_thread_pool_do_not_stall_another_tenant(
    client: TestClient,
    port: int,
    auth: Headers,
    other_auth: Headers,
    checkouts: Callable[[], int],
    path: str,
) -> None:
    # More slow clients than the thread pool's 40 tokens.
    uploads = [start_slow_json_upload(port, path, auth) for _ in range(48)]
    try:
        assert wait_until(lambda: checkouts() >= len(uploads), WAIT_S), f"{checkouts()} checkouts"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S) as other:
            assert other.get("/healthz").status_code == 200
            resp = other.get("/v1/datasets", headers=other_auth)
            assert resp.status_code == 200, resp.text
            # And a whole JSON upload of the other tenant is parsed and stored meanwhile.
            records = [{"text": "fine", "label": "pos"}, {"text": "dull", "label": "neg"}]
            body = {"kind": "classification", "records": records}
            resp = other.post("/v1/datasets", json=body, headers=other_auth)
            assert resp.status_code == 200, resp.text
            assert resp.json()["row_count"] == 2
    finally:
        for sock in uploads:
            sock.close()
