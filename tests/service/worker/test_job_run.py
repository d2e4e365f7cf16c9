"""A real worker run (``JobRun``, as ``loraplex worker`` runs each job) on the tiny base.

Jobs are created over HTTP, claimed and trained in this process against the test database,
then read back over HTTP: what the job object, its events, its checkpoints and the worker's
log say about the run.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types.fine_tuning import FineTuningJobEvent
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.base import FrozenBase
from core.training.trainer import ProgressEvent
from service.config import Settings
from service.jobs import checkpoints, outcomes, queue
from service.worker.job_run import JobRun, RunOutcome
from tests.core.training.conftest import sentiment_rows
from tests.service.helpers import Headers, claimed_run, create_dataset, shutdown_at_step

JOBS = "/v1/fine_tuning/jobs"


def _create(client: TestClient, auth: Headers, rows: int, hyper: dict[str, Any]) -> str:
    body = {
        "training_file": create_dataset(client, auth, sentiment_rows(rows)),
        "method": {"type": "lora", "hyperparameters": hyper},
        "seed": 3,
    }
    resp = client.post(JOBS, json=body, headers=auth)
    assert resp.status_code == 200, resp.text
    job_id: str = resp.json()["id"]
    return job_id


def _events(client: TestClient, auth: Headers, job_id: str) -> list[dict[str, Any]]:
    """Every event of the job, oldest first."""
    page = client.get(f"{JOBS}/{job_id}/events?order=asc&limit=100", headers=auth).json()
    assert page["has_more"] is False
    events: list[dict[str, Any]] = page["data"]
    return events


def test_a_finished_job_says_what_it_did(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    settings: Settings,
    tiny_base: FrozenBase,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 20 rows: 2 held out (10 % of each class), 18 train in 2 batches of 16: 6 steps.
    job_id = _create(client, auth, 20, {"n_epochs": 3})
    caplog.set_level(logging.INFO, logger="service.worker.job_run")
    assert claimed_run(db, settings, tiny_base).run() == RunOutcome.SUCCEEDED
    job = client.get(f"{JOBS}/{job_id}", headers=auth).json()

    # What was sent stays under method; the OpenAI fields hold the values used.
    assert job["method"]["hyperparameters"] == {"n_epochs": 3}
    assert job["hyperparameters"] == {
        "n_epochs": 3,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "learning_rate_multiplier": 1.0,
    }
    resolved = job["resolved_hyperparameters"]
    assert resolved["validation"] == "held_out" and resolved["validation_fraction"] == 0.1
    assert resolved["held_out_examples"] == 2 and resolved["train_examples"] == 18
    assert resolved["total_steps"] == 6 and resolved["steps_per_epoch"] == 2
    assert resolved["learning_rate"] == 1e-3 and resolved["warmup_steps"] == 0
    assert resolved["seed"] == 3 and resolved["max_seq_length"] == min(128, tiny_base.max_length)

    # Epochs completed: a finished 3-epoch job says 3, everywhere.
    assert job["progress"] == {"step": 6, "total_steps": 6, "epoch": 3.0}
    events = _events(client, auth, job_id)
    metrics = [e["data"] for e in events if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["epoch"] for m in metrics] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    ckpts = client.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()["data"]
    assert [(c["step_number"], c["epoch"]) for c in ckpts] == [(4, 2.0), (2, 1.0)]

    # Tokens: counted every step, the same on the job, its metrics and its last event; each
    # epoch trains on the same rows, so the count is three times one epoch's.
    tokens = job["trained_tokens"]
    assert tokens == job["metrics"]["trained_tokens"] == metrics[-1]["trained_tokens"]
    assert tokens > 0 and tokens % 3 == 0 and metrics[1]["trained_tokens"] == tokens // 3

    # The hold-out is said in the run's first event (after the queue's own).
    started = next(i for i, e in enumerate(events) if e["message"].startswith("Job started"))
    plan = events[started + 1]
    assert plan["message"].startswith("Training lora: 20 training rows, 2 of them held out")
    assert "validation_fraction=0.1" in plan["message"]
    assert plan["data"]["hyperparameters"] == resolved

    # The worker's log: the plan, progress lines as HF Trainer prints them, the outcome.
    lines = [r.getMessage() for r in caplog.records if job_id in r.getMessage()]
    assert any("resolved hyperparameters:" in x and "held_out_examples=2" in x for x in lines)
    progress = re.compile(
        rf"job {job_id} step (\d+)/6 \(\d+%\) epoch \d\.\d\d loss \d+\.\d{{4}} lr \S+ "
        r"\d+\.\d\d it/s"
    )
    steps = [int(m.group(1)) for x in lines if (m := progress.fullmatch(x))]
    assert steps[0] == 1 and steps[-1] == 6
    assert any(f"job {job_id} step 6/6 (100%) epoch 3.00 " in x for x in lines)
    assert any(x.startswith(f"job {job_id} validation at step 6: val_") for x in lines)
    end = [x for x in lines if x.startswith(f"job {job_id} succeeded:")]
    assert len(end) == 1 and f"{tokens} trained tokens" in end[0]
    assert "val_accuracy=" in end[0] and "train_loss=" in end[0]


class _PausingRun(JobRun):
    """Holds the training thread in step 3's progress report until the test lets it go."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at_step_3 = threading.Event()
        self.go_on = threading.Event()

    def _on_progress(self, ev: ProgressEvent) -> None:
        super()._on_progress(ev)
        if ev.step == 3:
            self.at_step_3.set()
            assert self.go_on.wait(60)


def test_cancel_stops_at_the_next_step_and_the_job_agrees_with_its_last_event(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    settings: Settings,
    tiny_base: FrozenBase,
) -> None:
    job_id = _create(client, auth, 40, {"n_epochs": 5, "batch_size": 2})  # 90 steps
    run = claimed_run(db, settings, tiny_base, _PausingRun)
    assert isinstance(run, _PausingRun)
    outcome: list[RunOutcome] = []
    thread = threading.Thread(target=lambda: outcome.append(run.run()))
    thread.start()
    try:
        assert run.at_step_3.wait(60)
        # Requested while step 3 is being reported, long before the next heartbeat.
        resp = client.post(f"{JOBS}/{job_id}/cancel", headers=auth)
        assert resp.json()["status"] == "cancel_requested"
    finally:
        run.go_on.set()
        thread.join(60)
    assert outcome == [RunOutcome.CANCELLED]

    job = client.get(f"{JOBS}/{job_id}", headers=auth).json()
    events = _events(client, auth, job_id)
    stepped = [e for e in events if e["data"] and "step" in e["data"]]
    # Step 3 was the last one trained: the check before step 4 saw the cancel.
    assert max(e["data"]["step"] for e in stepped) == 3
    last = events[-1]
    assert last["message"] == "Job cancelled at step 3/90"
    assert last["data"] == {"step": 3, "total_steps": 90, "epoch": 3 / 18}
    assert job["status"] == "cancelled"
    assert job["progress"] == {"step": 3, "total_steps": 90, "epoch": 3 / 18}
    last_metrics = [e["data"] for e in stepped if e["type"] == "metrics"][-1]
    assert last_metrics["step"] == 3
    assert job["trained_tokens"] == last_metrics["trained_tokens"] > 0


def test_a_resumed_job_counts_tokens_and_epochs_as_an_uninterrupted_one(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    settings: Settings,
    tiny_base: FrozenBase,
) -> None:
    hyper = {"n_epochs": 2, "batch_size": 4}  # 18 training rows: 5 steps an epoch, 10 in all
    clean_id = _create(client, auth, 20, hyper)
    assert claimed_run(db, settings, tiny_base).run() == RunOutcome.SUCCEEDED
    job_id = _create(client, auth, 20, hyper)

    assert claimed_run(db, settings, tiny_base, shutdown_at_step(3)).run() == RunOutcome.REQUEUED
    requeued = client.get(f"{JOBS}/{job_id}", headers=auth).json()
    assert requeued["status"] == "queued"
    assert requeued["progress"] == {"step": 3, "total_steps": 10, "epoch": 0.6}

    assert claimed_run(db, settings, tiny_base).run() == RunOutcome.SUCCEEDED
    clean = client.get(f"{JOBS}/{clean_id}", headers=auth).json()
    job = client.get(f"{JOBS}/{job_id}", headers=auth).json()
    assert job["progress"] == clean["progress"] == {"step": 10, "total_steps": 10, "epoch": 2.0}
    assert job["trained_tokens"] == clean["trained_tokens"] > 0
    assert job["resolved_hyperparameters"] == clean["resolved_hyperparameters"]
    resumed = [e for e in _events(client, auth, job_id) if e["message"].startswith("Resumed")]
    assert [e["message"] for e in resumed] == ["Resumed from checkpoint at step 3"]
    assert resumed[0]["data"]["hyperparameters"] == job["resolved_hyperparameters"]

    # Every event, the checkpoints' and the requeue's among them, is one the SDK's own type
    # accepts (its level is info, warn or error; its type message or metrics).
    events = _events(client, auth, job_id)
    for event in events:
        FineTuningJobEvent.model_validate(event)
    requeued_events = [e for e in events if e["message"] == "Job requeued: worker shutting down"]
    assert [e["level"] for e in requeued_events] == ["warn"]
    # A checkpoint is announced as a message; its step and id are in data.
    saved = [e for e in events if (e["data"] or {}).get("checkpoint_id")]
    ckpts = client.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()["data"]
    assert {e["data"]["checkpoint_id"] for e in saved} == {c["id"] for c in ckpts}
    assert all(e["type"] == "message" for e in saved)
    assert [e["message"] for e in saved if e["data"]["step"] == 3] == [
        "Checkpoint created at step 3"
    ]


def _away(calls: list[str], real: Any, when: set[int]) -> Any:
    """``real``, but a lost database on the calls numbered in ``when`` (from 1)."""

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(real.__name__)
        if sum(c == real.__name__ for c in calls) in when:
            raise OperationalError(real.__name__, {}, Exception("database is locked"))
        return real(*args, **kwargs)

    return flaky


def test_a_failed_read_of_the_cancel_flag_does_not_fail_the_job(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    settings: Settings,
    tiny_base: FrozenBase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = _create(client, auth, 20, {"n_epochs": 1})
    calls: list[str] = []
    # The database is away for the first two steps' reads.
    monkeypatch.setattr(
        queue, "is_cancel_requested", _away(calls, queue.is_cancel_requested, {1, 2})
    )
    assert claimed_run(db, settings, tiny_base).run() == RunOutcome.SUCCEEDED
    assert len(calls) > 2
    assert client.get(f"{JOBS}/{job_id}", headers=auth).json()["status"] == "succeeded"


def test_a_database_away_for_a_moment_while_training_fails_no_job(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    settings: Settings,
    tiny_base: FrozenBase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write the run can go on without (progress, an event, a checkpoint) is skipped, and
    the outcome's is retried: one dropped connection failed the job with internal_error."""
    job_id = _create(client, auth, 20, {"n_epochs": 3})  # 6 steps, checkpoints at 2 and 4
    calls: list[str] = []
    for module, name, when in (
        (queue, "report_progress", {1, 2}),
        (queue, "add_owned_event", {3}),
        (checkpoints, "save_checkpoint", {1}),
        (outcomes, "finish_success", {1, 2}),
    ):
        monkeypatch.setattr(module, name, _away(calls, getattr(module, name), when))
    assert claimed_run(db, settings, tiny_base).run() == RunOutcome.SUCCEEDED
    assert calls.count("finish_success") == 3
    job = client.get(f"{JOBS}/{job_id}", headers=auth).json()
    assert job["status"] == "succeeded" and job["fine_tuned_model"]
    assert job["progress"] == {"step": 6, "total_steps": 6, "epoch": 3.0}
    ckpts = client.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()["data"]
    assert [c["step_number"] for c in ckpts] == [4]  # step 2's was not saved


def test_a_database_away_while_a_run_starts_requeues_the_job_uncounted(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    settings: Settings,
    tiny_base: FrozenBase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = _create(client, auth, 20, {"n_epochs": 1})
    calls: list[str] = []
    flaky = _away(calls, checkpoints.latest_checkpoint, {1})
    monkeypatch.setattr(checkpoints, "latest_checkpoint", flaky)
    assert claimed_run(db, settings, tiny_base).run() == RunOutcome.REQUEUED
    job = client.get(f"{JOBS}/{job_id}", headers=auth).json()
    assert job["status"] == "queued" and job["error"] is None
    (event,) = [e for e in _events(client, auth, job_id) if "requeued" in e["message"]]
    assert event["message"] == "Job requeued: database unavailable (OperationalError)"
    assert event["level"] == "warn"
    assert claimed_run(db, settings, tiny_base).run() == RunOutcome.SUCCEEDED


def test_a_file_too_small_for_the_default_hold_out_trains_without_validation(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    settings: Settings,
    tiny_base: FrozenBase,
) -> None:
    """4 rows, 2 a label: 10% of a label holds out none. The job failed ("too few rows")."""
    job_id = _create(client, auth, 4, {"n_epochs": 1})
    assert claimed_run(db, settings, tiny_base).run() == RunOutcome.SUCCEEDED
    job = client.get(f"{JOBS}/{job_id}", headers=auth).json()
    resolved = job["resolved_hyperparameters"]
    assert (resolved["validation"], resolved["train_examples"]) == ("none", 4)
    assert resolved["held_out_examples"] == 0


def test_a_job_past_max_job_seconds_fails_and_keeps_its_checkpoint(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    settings: Settings,
    tiny_base: FrozenBase,
) -> None:
    job_id = _create(client, auth, 20, {"n_epochs": 5, "batch_size": 2})  # 45 steps
    # Any step takes longer than this: the check before step 2 stops the run.
    settings.max_job_seconds = 1e-6
    assert claimed_run(db, settings, tiny_base).run() == RunOutcome.FAILED

    job = client.get(f"{JOBS}/{job_id}", headers=auth).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "job_time_limit_exceeded"
    assert "longer than the 1e-06 s a job may take" in job["error"]["message"]
    assert "stopped at step 1" in job["error"]["message"]
    assert job["progress"]["step"] == 1 and job["progress"]["total_steps"] == 45
    ckpts = client.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()["data"]
    assert [c["step_number"] for c in ckpts] == [1]
    assert _events(client, auth, job_id)[-1]["message"].startswith("Job failed: training took")
