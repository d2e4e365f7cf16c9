"""/predict and /reward/compare under concurrency: batching must not change any answer.

The app runs its real serving hook (engine + batcher threads) on the tiny random base, with one
inference worker and with two sharing the engine; adapters are random non-zero LoRA weights
stored in the database as a finished job would store them.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.state import app_state
from tests.core.inference.helpers import lora, random_adapter
from tests.service.helpers import Headers, assert_error, store_adapter

TEXTS = [f"sample text number {i} with a few words" for i in range(24)]


pytestmark = pytest.mark.parametrize(
    "serving_client", [1, 2], ids=["1-worker", "2-workers"], indirect=True
)


def _predict(client: TestClient, auth: Headers, name: str, texts: list[str], mode: str = "auto"):
    return client.post(f"/predict?adapter={name}&mode={mode}", json={"inputs": texts}, headers=auth)


@pytest.fixture
def adapters(serving_client: TestClient, auth: Headers) -> list[str]:
    base = app_state(serving_client.app).require_base_model()
    names = []
    for i in range(12):
        adapter = lora(base, r=(2, 4, 8)[i % 3], seed=100 + i, n_labels=(2, 3)[i % 2])
        store_adapter(serving_client, auth, f"a{i}", adapter)
        names.append(f"a{i}")
    return names


def _single_answers(client: TestClient, auth: Headers, names: list[str]) -> dict[tuple, Any]:
    """Every (adapter, text) alone, one request at a time: the reference answers."""
    out = {}
    for name in names:
        for text in TEXTS[:6]:
            resp = _predict(client, auth, name, [text], mode="unmerged")
            assert resp.status_code == 200, resp.text
            out[(name, text)] = resp.json()["predictions"][0]
    return out


def test_concurrent_mixed_requests_equal_single_requests(
    serving_client: TestClient, auth: Headers, adapters: list[str]
) -> None:
    reference = _single_answers(serving_client, auth, adapters)
    jobs = [(name, text) for name in adapters for text in TEXTS[:6]] * 3
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(
            pool.map(lambda job: _predict(serving_client, auth, job[0], [job[1]], "unmerged"), jobs)
        )
    batcher = app_state(serving_client.app).require_batcher()
    assert batcher.stats.rows / batcher.stats.batches > 1, "requests were batched together"
    for (name, text), resp in zip(jobs, responses, strict=True):
        assert resp.status_code == 200, resp.text
        got, want = resp.json()["predictions"][0], reference[(name, text)]
        assert got["label"] == want["label"]
        for label, p in want["probabilities"].items():
            assert got["probabilities"][label] == pytest.approx(p, abs=1e-5)


def test_merged_and_auto_modes_agree_with_unmerged(
    serving_client: TestClient, auth: Headers, adapters: list[str]
) -> None:
    unmerged = _predict(serving_client, auth, "a0", TEXTS, "unmerged").json()["predictions"]
    for mode in ("merged", "auto"):
        resp = _predict(serving_client, auth, "a0", TEXTS, mode)
        assert resp.status_code == 200
        assert resp.json()["mode"] == mode
        for a, b in zip(unmerged, resp.json()["predictions"], strict=True):
            for label, p in a["probabilities"].items():
                assert b["probabilities"][label] == pytest.approx(p, abs=1e-4)


def test_tiny_cache_budget_evicts_and_still_answers_correctly(
    serving_client: TestClient, auth: Headers, adapters: list[str]
) -> None:
    reference = _single_answers(serving_client, auth, adapters[:4])
    engine = app_state(serving_client.app).require_batcher().engine
    one = max(engine.stats.resident_bytes // max(engine.stats.resident_count, 1), 1)
    engine.max_resident_bytes = 2 * one + one // 2  # room for about two adapters
    batcher = app_state(serving_client.app).require_batcher()
    batcher.call_soon(lambda: [engine.unload(k) for k in engine.resident_keys()])
    for _ in range(2):
        for (name, text), want in reference.items():
            got = _predict(serving_client, auth, name, [text], "unmerged").json()["predictions"][0]
            assert got["label"] == want["label"]
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    assert engine.stats.evictions > 0
    assert engine.stats.resident_bytes <= engine.max_resident_bytes


def test_delete_during_traffic_gives_404_after_and_never_500(
    serving_client: TestClient, auth: Headers, adapters: list[str]
) -> None:
    stop = threading.Event()
    statuses: list[int] = []

    def hammer() -> None:
        while not stop.is_set():
            statuses.append(_predict(serving_client, auth, "a1", TEXTS[:2]).status_code)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    while len(statuses) < 20:
        threading.Event().wait(0.01)
    assert serving_client.delete("/v1/adapters/a1", headers=auth).status_code == 200
    after = _predict(serving_client, auth, "a1", TEXTS[:2])
    stop.set()
    for t in threads:
        t.join()
    assert_error(after, 404, param="adapter", code="adapter_not_found")
    assert set(statuses) <= {200, 404}, statuses
    assert 200 in statuses
    # Other adapters are untouched.
    assert _predict(serving_client, auth, "a2", TEXTS[:2]).status_code == 200


def test_delete_drops_the_resident_copy_and_frees_its_bank_slot(
    serving_client: TestClient, auth: Headers
) -> None:
    batcher = app_state(serving_client.app).require_batcher()
    engine = batcher.engine
    store_adapter(serving_client, auth, "doomed", lora(engine.base, r=4, seed=7))
    assert _predict(serving_client, auth, "doomed", TEXTS[:1]).status_code == 200
    (key,) = [k for k in engine.resident_keys() if k[1] == "doomed"]
    slot = engine.slot_of(key)
    assert slot is not None and float(engine.bank.scale[slot]) != 0.0
    assert serving_client.delete("/v1/adapters/doomed", headers=auth).status_code == 200
    ran = threading.Event()
    batcher.call_soon(ran.set)  # commands run in order: the invalidation has run after it
    assert ran.wait(30)
    assert key not in engine.resident_keys()
    assert float(engine.bank.scale[slot]) == 0.0  # zeroed and back on the free list


def test_queue_limit_answers_503_with_retry_after(
    serving_client: TestClient, auth: Headers, adapters: list[str]
) -> None:
    batcher = app_state(serving_client.app).require_batcher()
    batcher.max_queue_rows = 4
    gate = threading.Event()
    batcher.call_soon(lambda: gate.wait(30))  # hold the batcher: no batch forms meanwhile
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [
                pool.submit(_predict, serving_client, auth, "a0", TEXTS[:3]) for _ in range(8)
            ]
            threading.Event().wait(1.0)
            gate.set()
            responses = [f.result(timeout=60) for f in futures]
    finally:
        gate.set()
    codes = sorted(r.status_code for r in responses)
    assert 503 in codes and 200 in codes, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["Retry-After"] == "1"
    assert_error(rejected, 503, code="queue_full")
    # Each refusal is counted (the counter stayed 0 while requests were refused).
    metrics = serving_client.get("/metrics").text
    assert f"loraplex_queue_rejected_requests_total {float(codes.count(503))}" in metrics


def test_reward_compare_and_predict_on_reward_adapter(
    serving_client: TestClient, auth: Headers
) -> None:
    base = app_state(serving_client.app).require_base_model()
    store_adapter(serving_client, auth, "rm", random_adapter(base, "lora", {"r": 4}, None, seed=3))
    one = serving_client.post(
        "/reward/compare?adapter=rm",
        json={"prompt": "q", "response_a": "good answer", "response_b": "bad answer"},
        headers=auth,
    )
    assert one.status_code == 200, one.text
    body = one.json()
    swapped = serving_client.post(
        "/reward/compare?adapter=rm",
        json={"prompt": "q", "response_a": "bad answer", "response_b": "good answer"},
        headers=auth,
    ).json()
    assert body["p_a_preferred"] + swapped["p_a_preferred"] == pytest.approx(1.0, abs=1e-6)
    assert body["reward_a"] == pytest.approx(swapped["reward_b"], abs=1e-5)
    batch = serving_client.post(
        "/reward/compare?adapter=rm",
        json={"pairs": [{"prompt": "q", "response_a": "good answer", "response_b": "bad answer"}]},
        headers=auth,
    ).json()
    assert batch["results"][0]["p_a_preferred"] == pytest.approx(body["p_a_preferred"], abs=1e-6)
    rewards = _predict(serving_client, auth, "rm", ["good answer"]).json()["predictions"]
    assert set(rewards[0]) == {"reward"}


def test_reward_compare_splits_whole_dialogues_as_training_did(
    serving_client: TestClient, auth: Headers
) -> None:
    """Two whole dialogues sent without a prompt score exactly as their split pair sent with
    the shared turns as prompt, when the adapter was trained splitting them; an adapter trained
    on whole dialogues scores them whole."""
    from dataclasses import replace

    base = app_state(serving_client.app).require_base_model()
    adapter = random_adapter(base, "lora", {"r": 4}, None, seed=3)
    split = replace(adapter, head=adapter.head.model_copy(update={"split_shared_prefix": True}))
    store_adapter(serving_client, auth, "split", split)
    store_adapter(serving_client, auth, "whole", adapter)
    shared = "\n\nHuman: is the film good\n\nAssistant:"
    whole = {"response_a": f"{shared} yes it is", "response_b": f"{shared} no"}
    pair = {"prompt": shared.strip(), "response_a": "yes it is", "response_b": "no"}

    def compare(name: str, body: dict[str, str]) -> dict[str, Any]:
        r = serving_client.post(f"/reward/compare?adapter={name}", json=body, headers=auth)
        assert r.status_code == 200, r.text
        return dict(r.json())

    scored, expected = compare("split", whole), compare("split", pair)
    assert (scored["reward_a"], scored["reward_b"]) == (expected["reward_a"], expected["reward_b"])
    as_given = compare("whole", whole)
    assert as_given["reward_a"] != pytest.approx(expected["reward_a"], abs=1e-4)


def test_predict_errors(serving_client: TestClient, auth: Headers, adapters: list[str]) -> None:
    assert_error(_predict(serving_client, auth, "missing", ["x"]), 404, param="adapter")
    assert_error(_predict(serving_client, auth, "a0", []), 422, param="inputs")
    assert_error(_predict(serving_client, auth, "a0", [""]), 422)
    bad_mode = _predict(serving_client, auth, "a0", ["x"], mode="fast")
    assert_error(bad_mode, 422, param="mode")
    too_long = serving_client.post(
        "/predict?adapter=a0", json={"inputs": ["word " * 2000], "truncate": False}, headers=auth
    )
    assert_error(too_long, 422, param="inputs.0", code="input_too_long")
    truncated = _predict(serving_client, auth, "a0", ["word " * 2000])
    assert truncated.status_code == 200
    wrong_task = serving_client.post(
        "/reward/compare?adapter=a0", json={"response_a": "a", "response_b": "b"}, headers=auth
    )
    assert_error(wrong_task, 422, param="adapter", code="adapter_task_mismatch")


def test_burst_of_requests_for_cold_adapters_all_succeed(
    serving_client: TestClient, auth: Headers
) -> None:
    # More concurrent requests than the connection pool holds, every adapter cold: requests
    # must not hold pooled connections while they wait for the loads they depend on.
    base = app_state(serving_client.app).require_base_model()
    for i in range(12):
        store_adapter(serving_client, auth, f"c{i}", lora(base, r=4, seed=i))
    with ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(
            pool.map(lambda i: _predict(serving_client, auth, f"c{i % 12}", ["hello"]), range(48))
        )
    assert [r.status_code for r in responses] == [200] * 48
