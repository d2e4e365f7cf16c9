"""The README walkthrough against a real server: train, predict, reward, cancel, restart.

Real MiniLM weights, a real SQLite file, real HTTP. Figures the test measures (accuracy, job
durations) are printed so ``pytest -s`` shows them.
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest

from tests.e2e.conftest import load_jsonl
from tests.e2e.server import ServerProcess, wait_job

pytestmark = pytest.mark.real_model

LORA_HYPER = {"n_epochs": 3, "batch_size": 16, "learning_rate": 2e-3, "warmup_ratio": 0.1}


@pytest.fixture(scope="module")
def rt_rows() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rows = load_jsonl("rotten_tomatoes_small.jsonl")
    return rows[:400], rows[400:520]


def _upload(client: httpx.Client, kind: str, records: list[dict[str, str]], name: str) -> str:
    r = client.post("/v1/datasets", json={"kind": kind, "name": name, "records": records})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["row_count"] == len(records)
    return str(body["id"])


def _train(client: httpx.Client, file_id: str, name: str, method: dict[str, object]) -> dict:
    r = client.post(
        "/v1/fine_tuning/jobs",
        json={"training_file": file_id, "adapter_name": name, "seed": 7, "method": method},
    )
    assert r.status_code == 200, r.text
    start = time.monotonic()
    job = wait_job(client, r.json()["id"])
    print(f"\n{name}: {job['status']} in {time.monotonic() - start:.1f} s")
    assert job["status"] == "succeeded", job
    assert job["fine_tuned_adapter"] == name
    assert job["progress"]["step"] == job["progress"]["total_steps"] > 0
    return job


def _predict(client: httpx.Client, adapter: str, texts: list[str], mode: str = "auto") -> list:
    r = client.post(f"/predict?adapter={adapter}&mode={mode}", json={"inputs": texts})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_lora_classifier_beats_majority_and_survives_restart(
    live_server: ServerProcess, rt_rows: tuple[list[dict[str, str]], list[dict[str, str]]]
) -> None:
    train, test = rt_rows
    with live_server.client() as client:
        file_id = _upload(client, "classification", train, "rt-train")
        job = _train(
            client,
            file_id,
            "sentiment",
            {"type": "lora", "lora": {"r": 8}, "hyperparameters": LORA_HYPER},
        )
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]
        curve = [e for e in events if e["type"] == "metrics" and "train_loss" in (e["data"] or {})]
        assert len(curve) >= 3, "the job reports its training loss as it goes"

        preds = _predict(client, "sentiment", [r["text"] for r in test])
        accuracy = sum(p["label"] == r["label"] for p, r in zip(preds, test, strict=True)) / len(
            test
        )
        majority = max(Counter(r["label"] for r in test).values()) / len(test)
        print(f"held-out accuracy {accuracy:.3f} vs majority {majority:.3f}")
        assert accuracy > majority
        for p in preds:
            assert abs(sum(p["probabilities"].values()) - 1.0) < 1e-5
            assert p["score"] == max(p["probabilities"].values())
        merged = _predict(client, "sentiment", [r["text"] for r in test[:16]], mode="merged")
        for a, b in zip(preds[:16], merged, strict=True):
            assert a["label"] == b["label"]
            assert abs(a["score"] - b["score"]) < 1e-4

    # Restart the process on the same data directory: the adapter is still served, the same.
    live_server.stop()
    live_server.start()
    with live_server.client() as client:
        again = _predict(client, "sentiment", [r["text"] for r in test[:16]], mode="unmerged")
        for a, b in zip(preds[:16], again, strict=True):
            assert a["label"] == b["label"]
            assert abs(a["score"] - b["score"]) < 1e-5
        listed = client.get("/v1/adapters").json()["data"]
        assert [a["name"] for a in listed] == ["sentiment"]


def test_reward_model_ranks_chosen_over_rejected(live_server: ServerProcess) -> None:
    pairs = load_jsonl("rt_preference_small.jsonl")
    keep = ("prompt", "chosen", "rejected")
    train = [{k: p[k] for k in keep} for p in pairs if p["split"] == "train"]
    test = [p for p in pairs if p["split"] == "test"]
    with live_server.client() as client:
        file_id = _upload(client, "preference", train, "rt-pairs")
        _train(
            client,
            file_id,
            "taste",
            {
                "type": "lora",
                "lora": {"r": 8},
                "hyperparameters": {"n_epochs": 2, "batch_size": 16, "learning_rate": 2e-3},
            },
        )
        body = {
            "pairs": [
                {"prompt": p["prompt"], "response_a": p["chosen"], "response_b": p["rejected"]}
                for p in test
            ]
        }
        results = client.post("/reward/compare?adapter=taste", json=body).json()["results"]
        wins = sum(r["preferred"] == "a" for r in results) / len(results)
        print(f"reward model prefers chosen in {wins:.3f} of {len(results)} held-out pairs")
        assert wins > 0.5
        for r in results:
            assert r["p_a_preferred"] == pytest.approx(
                1 / (1 + pow(2.718281828459045, r["reward_b"] - r["reward_a"])), abs=1e-6
            )

        swapped = {
            "pairs": [
                {"prompt": p["prompt"], "response_a": p["rejected"], "response_b": p["chosen"]}
                for p in test[:10]
            ]
        }
        flipped = client.post("/reward/compare?adapter=taste", json=swapped).json()["results"]
        for a, b in zip(results[:10], flipped, strict=True):
            assert a["p_a_preferred"] + b["p_a_preferred"] == pytest.approx(1.0, abs=1e-5)

        single = client.post(
            "/reward/compare?adapter=taste",
            json={"response_a": test[0]["chosen"], "response_b": test[0]["rejected"]},
        )
        assert single.status_code == 200 and set(single.json()) >= {"reward_a", "p_a_preferred"}
        rewards = _predict(client, "taste", [test[0]["chosen"]])
        assert isinstance(rewards[0]["reward"], float)
        wrong = client.post(
            "/reward/compare?adapter=sentiment", json={"response_a": "a", "response_b": "b"}
        )
        assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "adapter"


def test_cancel_running_job(live_server: ServerProcess) -> None:
    rows = load_jsonl("rotten_tomatoes_small.jsonl")[:200]
    with live_server.client() as client:
        file_id = _upload(client, "classification", rows, "rt-cancel")
        r = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "training_file": file_id,
                "method": {"type": "lora", "hyperparameters": {"n_epochs": 200, "batch_size": 8}},
            },
        )
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["progress"]["step"] < 2:
            assert time.monotonic() < deadline, "job never started"
            time.sleep(0.3)
        cancel = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
        assert cancel.status_code == 200
        assert cancel.json()["status"] in {"cancel_requested", "cancelled"}
        job = wait_job(client, job_id, timeout=60)
        assert job["status"] == "cancelled"
        assert job["fine_tuned_adapter"] is None
        assert job["progress"]["step"] < job["progress"]["total_steps"]
        again = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
        assert again.status_code == 409
