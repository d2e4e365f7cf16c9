"""``POST /v1/fine_tuning/jobs`` refuses at creation what a job could only fail on, or ignore,
later: a prompt-tuning ``init_text`` of no tokens, and validation settings in a job with no
validation set."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import Job
from tests.service.helpers import Headers, assert_error, create_dataset, job_body

JOBS = "/v1/fine_tuning/jobs"


def _job_rows(db: sessionmaker[Session]) -> int:
    with db() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


@pytest.mark.parametrize("text", ["\u200b", "\u0000", "\u200b \u200b", "\u0301", "\ufffd"])
def test_an_init_text_of_no_tokens_is_422_at_creation(
    client: TestClient, auth: Headers, db: sessionmaker[Session], text: str
) -> None:
    """Not blank, so the config passed it, but MiniLM's tokenizer drops a zero-width space and
    a NUL: the job was queued and the worker failed it ("tokenizes to no tokens")."""
    train = create_dataset(client, auth)
    params = {"init": "text", "init_text": text, "n_virtual_tokens": 4}
    method = {"type": "prompt_tuning", "prompt_tuning": params}
    resp = client.post(JOBS, json={"training_file": train, "method": method}, headers=auth)
    error = assert_error(resp, 422, param="method.prompt_tuning.init_text", code="invalid_method")
    assert "init_text with a character that makes a token" in error["message"]
    assert client.get(JOBS, headers=auth).json()["data"] == []
    assert _job_rows(db) == 0
    params["init_text"] = f"{text}positive"  # a token, around the dropped characters
    resp = client.post(JOBS, json={"training_file": train, "method": method}, headers=auth)
    assert resp.status_code == 200, resp.text
    assert resp.json()["method"]["prompt_tuning"]["init_text"] == f"{text}positive"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("early_stopping_patience", 2),
        ("eval_every_steps", 5),
        ("eval_batch_size", 8),
        ("metric_for_best", "loss"),
    ],
)
def test_validation_settings_without_a_validation_set_are_refused(
    client: TestClient, auth: Headers, db: sessionmaker[Session], setting: str, value: int
) -> None:
    """With validation_fraction 0 and no validation_file nothing is ever evaluated: they were
    accepted and never acted."""
    train = create_dataset(client, auth)
    body = job_body(train)
    body["method"]["hyperparameters"] |= {"validation_fraction": 0, setting: value}
    param = f"method.hyperparameters.{setting}"
    error = assert_error(
        client.post(JOBS, json=body, headers=auth), 422, param=param, code="setting_not_read"
    )
    assert "no validation set" in error["message"]
    assert (
        "validation_file" in error["message"] and "validation_fraction above 0" in error["message"]
    )
    assert _job_rows(db) == 0
    # A validation set of either kind reads it.
    valid = create_dataset(client, auth)
    assert client.post(JOBS, json={**body, "validation_file": valid}, headers=auth).is_success
    body["method"]["hyperparameters"]["validation_fraction"] = 0.25
    assert client.post(JOBS, json=body, headers=auth).status_code == 200
    # Left out or null (the default) asks for nothing.
    body["method"]["hyperparameters"] |= {"validation_fraction": 0, setting: None}
    assert client.post(JOBS, json=body, headers=auth).status_code == 200
    del body["method"]["hyperparameters"][setting]
    assert client.post(JOBS, json=body, headers=auth).status_code == 200


def test_a_validation_fraction_that_holds_out_no_row_is_refused_only_when_sent(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    """Two rows a label: 10% of each holds out none. Sent, that was a 200 and then a failed
    job; by default the job trains every row and validates none."""
    body = job_body(create_dataset(client, auth))
    body["method"]["hyperparameters"]["validation_fraction"] = 0.1
    error = assert_error(
        client.post(JOBS, json=body, headers=auth),
        422,
        param="method.hyperparameters.validation_fraction",
        code="too_few_rows",
    )
    assert "too few rows (4) to hold out 10% for validation" in error["message"]
    assert _job_rows(db) == 0
    del body["method"]["hyperparameters"]["validation_fraction"]
    assert client.post(JOBS, json=body, headers=auth).status_code == 200
