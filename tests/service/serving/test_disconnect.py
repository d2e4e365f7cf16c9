"""A client that leaves while its inference rows wait in the batcher has them dropped.

Before, its rows were computed for nobody: a flooding tenant whose clients time out kept
taking its share of every batch. The app (serving hook on the tiny random base) runs behind a
real uvicorn server; the batcher's owner thread is held so that the request's rows stay queued
while its client closes the connection.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.state import app_state
from tests.core.inference.helpers import lora
from tests.service.helpers import Headers, store_adapter, uvicorn_serving, wait_until

WAIT_S = 30.0
PAIR = {"prompt": "a question", "response_a": "one answer", "response_b": "another answer"}


@pytest.fixture
def port(serving_client: TestClient) -> Iterator[int]:
    with uvicorn_serving(serving_client.app, WAIT_S) as port:
        yield port


@pytest.mark.parametrize(
    ("path", "body", "rows"),
    [
        ("/predict?adapter=scorer", {"inputs": ["a short review"] * 8}, 8),
        ("/reward/compare?adapter=scorer", {"pairs": [PAIR] * 4}, 8),
    ],
    ids=["predict", "compare"],
)
def test_rows_of_a_client_that_left_are_never_computed(
    serving_client: TestClient,
    auth: Headers,
    port: int,
    caplog: pytest.LogCaptureFixture,
    path: str,
    body: dict[str, Any],
    rows: int,
) -> None:
    state = app_state(serving_client.app)
    store_adapter(
        serving_client, auth, "scorer", lora(state.require_base_model(), 4, n_labels=None)
    )
    batcher = state.require_batcher()
    computed = batcher.stats.rows
    held = threading.Event()
    batcher.call_soon(held.wait)  # the owner thread forms no batch until released
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: {auth['Authorization']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    with caplog.at_level(logging.INFO, logger="service.api.errors"):
        try:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(head.encode() + payload)
                assert wait_until(lambda: batcher.queued_rows == rows), batcher.queued_rows
            # The client is gone: its rows leave the queue before any batch could take them.
            dropped = wait_until(lambda: batcher.queued_rows == 0)
        finally:
            held.set()
        assert dropped, f"{batcher.queued_rows} rows of a gone client still queued"
        assert wait_until(lambda: "client disconnected during POST" in caplog.text)
    disconnects = [r for r in caplog.records if "client disconnected" in r.getMessage()]
    assert [r.levelname for r in disconnects] == ["INFO"]
    # The next request is answered, and its one row is the only one computed since.
    resp = serving_client.post(
        "/predict?adapter=scorer", json={"inputs": ["one more"]}, headers=auth
    )
    assert resp.status_code == 200, resp.text
    assert batcher.stats.rows == computed + 1
