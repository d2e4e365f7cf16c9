"""A reward job's first event says what encoding made of its pairs."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from core.base import FrozenBase
from service.config import Settings
from service.worker.job_run import RunOutcome
from tests.service.helpers import Headers, claimed_run, create_dataset

JOBS = "/v1/fine_tuning/jobs"
DIALOGUE = "\n\nHuman: is it good"


def test_the_plan_event_counts_split_and_identical_pairs(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    settings: Settings,
    tiny_base: FrozenBase,
) -> None:
    rows = [
        {"chosen": f"{DIALOGUE}\n\nAssistant: yes", "rejected": f"{DIALOGUE}\n\nAssistant: no"},
        {"chosen": "The Movie", "rejected": "the movie"},  # one input once lower-cased
        {"chosen": "good fun", "rejected": "bad"},
    ] * 4
    body = {
        "training_file": create_dataset(client, auth, rows, kind="preference"),
        "method": {"type": "lora", "hyperparameters": {"max_steps": 1}},
    }
    job_id = client.post(JOBS, json=body, headers=auth).json()["id"]
    assert claimed_run(db, settings, tiny_base).run() == RunOutcome.SUCCEEDED
    page = client.get(f"{JOBS}/{job_id}/events?order=asc&limit=100", headers=auth).json()
    plan = next(e for e in page["data"] if e["message"].startswith("Training lora"))
    assert plan["data"]["pairs"] == {"split_rows": 4, "identical_pairs": 4}
    assert "4 pairs split at their shared dialogue" in plan["message"]
    assert "4 pairs are the same input once tokenized" in plan["message"]
