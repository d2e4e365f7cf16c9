"""/predict against an adapter cache (LORAPLEX_ADAPTER_CACHE_MB) smaller than the adapters a
batch uses: every adapter that fits the cache alone is answered, one that never fits is a
409 naming the setting, not a 503 to retry."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.state import app_state
from tests.core.inference.helpers import lora
from tests.service.helpers import Headers, assert_error, store_adapter

NAMES = ["c0", "c1", "c2", "c3"]
TEXT = "the movie was great"

pytestmark = pytest.mark.parametrize(
    "serving_client", [1, 2], ids=["1-worker", "2-workers"], indirect=True
)


def _predict(client: TestClient, auth: Headers, name: str) -> Any:
    return client.post(
        f"/predict?adapter={name}&mode=unmerged", json={"inputs": [TEXT]}, headers=auth
    )


@pytest.fixture
def one_adapter_bytes(serving_client: TestClient, auth: Headers) -> int:
    """Stores NAMES (LoRA r=4: one size) and answers each once; the bytes each is charged."""
    base = app_state(serving_client.app).require_base_model()
    for i, name in enumerate(NAMES):
        store_adapter(serving_client, auth, name, lora(base, 4, seed=10 + i))
    for name in NAMES:
        assert _predict(serving_client, auth, name).status_code == 200
    stats = app_state(serving_client.app).require_batcher().engine.stats
    assert stats.resident_count == len(NAMES)
    return stats.resident_bytes // len(NAMES)


def _set_cache(client: TestClient, nbytes: int) -> None:
    """The engine's budget set to ``nbytes``, emptied, on the batcher's thread (its owner)."""
    batcher = app_state(client.app).require_batcher()
    engine = batcher.engine

    def empty() -> None:
        engine.max_resident_bytes = nbytes
        for key in engine.resident_keys():
            engine.unload(key)

    batcher.call_soon(empty)


def test_one_batch_of_more_adapters_than_the_cache_holds_answers_every_request(
    serving_client: TestClient, auth: Headers, one_adapter_bytes: int
) -> None:
    alone = {name: _predict(serving_client, auth, name).json() for name in NAMES}
    _set_cache(serving_client, 2 * one_adapter_bytes)  # room for two of the four
    batcher = app_state(serving_client.app).require_batcher()
    gate = threading.Event()
    batcher.call_soon(lambda: gate.wait(60))  # the batcher waits: the four requests queue
    try:
        with ThreadPoolExecutor(max_workers=len(NAMES)) as pool:
            pending = [pool.submit(_predict, serving_client, auth, name) for name in NAMES]
            for _ in range(6000):
                if batcher.queued_rows == len(NAMES):
                    break
                threading.Event().wait(0.01)
            assert batcher.queued_rows == len(NAMES)
            gate.set()  # one batch of all four
            responses = [p.result() for p in pending]
    finally:
        gate.set()
    for name, resp in zip(NAMES, responses, strict=True):
        assert resp.status_code == 200, resp.text
        got, want = resp.json()["predictions"][0], alone[name]["predictions"][0]
        assert got["label"] == want["label"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    stats = batcher.engine.stats
    assert stats.evictions >= 2 and stats.resident_bytes <= 2 * one_adapter_bytes


def test_an_adapter_larger_than_the_whole_cache_is_refused_for_good(
    serving_client: TestClient, auth: Headers, one_adapter_bytes: int
) -> None:
    _set_cache(serving_client, one_adapter_bytes - 1)
    resp = _predict(serving_client, auth, "c0")
    assert_error(
        resp,
        409,
        code="adapter_too_large_for_cache",
        param="adapter",
        contains="LORAPLEX_ADAPTER_CACHE_MB",
    )
    assert f"needs {one_adapter_bytes} bytes" in resp.json()["error"]["message"]
    assert resp.headers["x-should-retry"] == "false" and "retry-after" not in resp.headers
    _set_cache(serving_client, one_adapter_bytes)  # it fits alone again: served
    assert _predict(serving_client, auth, "c0").status_code == 200
