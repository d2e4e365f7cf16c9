"""``/v1/fine_tuning/jobs`` over HTTP: creation checks, listing, events, cancel, isolation."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types.fine_tuning import FineTuningJobEvent
from sqlalchemy.orm import Session, sessionmaker

from service.api.schemas.jobs import JobCreate
from service.api.schemas.methods import API_METHODS
from service.db.models import Job
from service.jobs import queue
from service.jobs.checkpoints import save_checkpoint
from service.jobs.events import add_event
from service.jobs.outcomes import finish_cancelled, finish_success
from service.state import app_state
from tests.core.training.conftest import sentiment_rows
from tests.service.helpers import (
    Headers,
    adapter_row,
    assert_error,
    create_dataset,
    job_body,
    tenant_id_by_name,
)

JOBS = "/v1/fine_tuning/jobs"
QUEUED_HOLDING_OUT = (
    "Files validated; job queued; no validation_file, so 10% of the training rows will be "
    "held out for validation (validation_fraction; set it to 0 to train on every row)"
)


def _create(client: TestClient, headers: Headers, body: dict[str, Any]) -> dict[str, Any]:
    resp = client.post(JOBS, json=body, headers=headers)
    assert resp.status_code == 200, resp.text
    job: dict[str, Any] = resp.json()
    return job


def test_create_job_is_queued_and_openai_shaped(client: TestClient, auth: Headers) -> None:
    train = create_dataset(client, auth)
    valid = create_dataset(
        client, auth, [{"text": "fine", "label": "pos"}, {"text": "meh", "label": "neg"}]
    )
    body = job_body(train, validation_file=valid, adapter_name="sentiment-v1", seed=42)
    body["method"]["hyperparameters"] |= {"learning_rate": 1e-3, "lr_scheduler": "cosine"}
    job = _create(client, auth, body)

    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job"
    assert job["status"] == "queued"
    assert job["training_file"] == train and job["validation_file"] == valid
    assert job["adapter_name"] == "sentiment-v1" and job["seed"] == 42
    assert job["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert job["method"] == {
        "type": "lora",
        "lora": {"r": 8},
        "hyperparameters": {"n_epochs": 1, "learning_rate": 1e-3, "lr_scheduler": "cosine"},
    }
    # As sent, and the learning rate as OpenAI's multiplier of the method's default.
    assert job["hyperparameters"] == {
        **job["method"]["hyperparameters"],
        "learning_rate_multiplier": 1.0,
    }
    assert job["fine_tuned_adapter"] is None and job["fine_tuned_model"] is None
    assert job["error"] is None and job["finished_at"] is None
    assert job["progress"] == {"step": 0, "total_steps": None, "epoch": None}
    assert job["metrics"] == {} and job["estimated_finish"] is None
    # Known once a worker has set the run up (tests/service/worker/test_job_run.py).
    assert job["resolved_hyperparameters"] is None and job["trained_tokens"] is None
    assert isinstance(job["created_at"], int)

    assert client.get(f"{JOBS}/{job['id']}", headers=auth).json() == job
    events = client.get(f"{JOBS}/{job['id']}/events", headers=auth).json()
    assert [e["message"] for e in events["data"]] == [
        "Files validated; job queued",
        f"Validating training file: {train}",
    ]
    assert events["data"][0]["object"] == "fine_tuning.job.event"
    assert events["data"][0]["id"].startswith("ftevent-")


def test_generated_adapter_name_and_seed(client: TestClient, auth: Headers) -> None:
    train = create_dataset(client, auth)
    job = _create(client, auth, job_body(train))
    assert re.fullmatch(r"lora-[0-9a-f]{6}", job["adapter_name"])
    assert isinstance(job["seed"], int)
    job = _create(client, auth, job_body(train, suffix="spam"))
    assert re.fullmatch(r"lora-spam-[0-9a-f]{6}", job["adapter_name"])


def test_every_suffix_accepted_makes_a_name_that_fits() -> None:
    """The name generated from a suffix, ``<method type>-<suffix>-<6 hex>``, must fit the
    adapter name's limit: a suffix longer than the room the longest method type leaves (OpenAI
    takes 64 characters) would make a name no adapter can hold."""

    def max_length(field: str) -> int:
        (bound,) = [
            m.max_length for m in JobCreate.model_fields[field].metadata if hasattr(m, "max_length")
        ]
        assert isinstance(bound, int)
        return bound

    longest = max(len(m) for m in API_METHODS)
    assert longest + len("-") + max_length("suffix") + len("-") + 6 <= max_length("adapter_name")


def test_unknown_training_file_is_404(client: TestClient, auth: Headers) -> None:
    resp = client.post(JOBS, json=job_body("file-nope"), headers=auth)
    assert_error(resp, 404, param="training_file", code="dataset_not_found")
    assert client.get(JOBS, headers=auth).json()["data"] == []  # nothing half-created


def test_unknown_validation_file_is_404(client: TestClient, auth: Headers) -> None:
    train = create_dataset(client, auth)
    resp = client.post(JOBS, json=job_body(train, validation_file="file-nope"), headers=auth)
    assert_error(resp, 404, param="validation_file")


def test_other_tenants_file_is_404(client: TestClient, auth: Headers, other_auth: Headers) -> None:
    theirs = create_dataset(client, other_auth)
    assert_error(client.post(JOBS, json=job_body(theirs), headers=auth), 404, param="training_file")


def test_validation_labels_must_be_known(client: TestClient, auth: Headers) -> None:
    train = create_dataset(client, auth)
    valid = create_dataset(
        client, auth, [{"text": "a", "label": "pos"}, {"text": "b", "label": "neutral"}]
    )
    error = assert_error(
        client.post(JOBS, json=job_body(train, validation_file=valid), headers=auth),
        422,
        param="validation_file",
        code="unknown_validation_labels",
    )
    assert "'neutral'" in error["message"]


def test_dataset_kinds_must_match(client: TestClient, auth: Headers) -> None:
    train = create_dataset(client, auth)
    prefs = create_dataset(client, auth, [{"chosen": "a", "rejected": "b"}], kind="preference")
    assert_error(
        client.post(JOBS, json=job_body(train, validation_file=prefs), headers=auth),
        422,
        param="validation_file",
        code="dataset_kind_mismatch",
    )


def test_method_shape_errors(client: TestClient, auth: Headers) -> None:
    train = create_dataset(client, auth)
    body = job_body(train)
    body["method"] = {"type": "dora"}
    assert_error(client.post(JOBS, json=body, headers=auth), 422, param="method.type")
    body["method"] = {"type": "adapter", "lora": {"r": 8}}
    error = assert_error(client.post(JOBS, json=body, headers=auth), 422, param="method")
    assert "'lora'" in error["message"]
    body["method"] = {"type": "lora", "hyperparameters": {"n_epochs": 0}}
    assert_error(
        client.post(JOBS, json=body, headers=auth), 422, param="method.hyperparameters.n_epochs"
    )
    body = job_body(train, adapter_name="has space")
    assert_error(client.post(JOBS, json=body, headers=auth), 422, param="adapter_name")
    body = job_body(train, surprise=True)
    assert_error(client.post(JOBS, json=body, headers=auth), 422, param="surprise")


@pytest.mark.parametrize(
    ("method", "param"),
    [
        ({"type": "lora", "hyperparameters": {"batch_size": True}}, "hyperparameters.batch_size"),
        (
            {"type": "lora", "hyperparameters": {"warmup_ratio": False}},
            "hyperparameters.warmup_ratio",
        ),
        ({"type": "lora", "lora": {"r": True}}, "lora.r"),
        ({"type": "lora", "lora": {"layers": [0, True]}}, "lora.layers"),
        ({"type": "supervised", "supervised": {"hyperparameters": {"batch_size": True}}}, None),
    ],
)
def test_a_boolean_is_no_number(
    client: TestClient, auth: Headers, method: dict[str, Any], param: str | None
) -> None:
    """Lax parsing took batch_size: true as 1 and trained with it."""
    body = job_body(create_dataset(client, auth), method=method)
    error = assert_error(client.post(JOBS, json=body, headers=auth), 422)
    assert error["param"].startswith(f"method.{param}" if param else "method")
    assert "boolean" in error["message"]
    # A number in a string stays accepted, as before.
    body["method"] = {"type": "lora", "hyperparameters": {"batch_size": "4"}}
    created = client.post(JOBS, json=body, headers=auth)
    assert created.status_code == 200, created.text
    assert created.json()["method"]["hyperparameters"]["batch_size"] == 4


@pytest.mark.parametrize(
    ("layers", "code", "says"),
    [([0, 99], "invalid_method", "out of range"), ([-1], "greater_than_equal", "greater than")],
)
def test_lora_layers_outside_the_base_are_422_at_creation(
    client: TestClient, auth: Headers, layers: list[int], code: str, says: str
) -> None:
    """They used to fail only in the worker, as invalid_training_data."""
    body = job_body(create_dataset(client, auth))
    body["method"]["lora"]["layers"] = layers
    error = assert_error(client.post(JOBS, json=body, headers=auth), 422, code=code)
    assert error["param"].startswith("method.lora.layers") and says in error["message"]
    body["method"]["lora"]["layers"] = [0, 5]  # MiniLM's six layers
    assert client.post(JOBS, json=body, headers=auth).status_code == 200


def test_an_empty_lora_layer_list_is_422_at_creation(client: TestClient, auth: Headers) -> None:
    """It was accepted, and trained the head alone."""
    body = job_body(create_dataset(client, auth))
    body["method"]["lora"]["layers"] = []
    error = assert_error(
        client.post(JOBS, json=body, headers=auth), 422, param="method.lora.layers"
    )
    assert "adapts no layer" in error["message"]
    assert client.get(JOBS, headers=auth).json()["data"] == []


def test_prompt_tuning_that_fills_the_window_is_422_at_creation(
    client: TestClient, auth: Headers
) -> None:
    """256 virtual tokens fill MiniLM's 256-token window: the worker failed the job."""
    train = create_dataset(client, auth)
    for n, status in [(256, 422), (255, 200)]:
        method = {"type": "prompt_tuning", "prompt_tuning": {"n_virtual_tokens": n}}
        resp = client.post(JOBS, json={"training_file": train, "method": method}, headers=auth)
        if status == 422:
            error = assert_error(resp, 422, param="method.prompt_tuning.n_virtual_tokens")
            assert "window of 256 tokens" in error["message"]
        else:
            assert resp.status_code == 200, resp.text


def test_macro_f1_is_422_at_creation_on_a_preference_job(client: TestClient, auth: Headers) -> None:
    """A reward model has no macro_f1: the worker failed the job."""
    prefs = create_dataset(client, auth, [{"chosen": "a", "rejected": "b"}] * 4, kind="preference")
    hyper = {"metric_for_best": "macro_f1"}
    body = {"training_file": prefs, "method": {"type": "lora", "hyperparameters": hyper}}
    error = assert_error(
        client.post(JOBS, json=body, headers=auth),
        422,
        param="method.hyperparameters.metric_for_best",
        code="invalid_method",
    )
    assert "classification metric" in error["message"] and "reward" in error["message"]
    body["training_file"] = create_dataset(client, auth)  # a classifier has it
    assert client.post(JOBS, json=body, headers=auth).status_code == 200


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("margin", 5.0),
        ("center_rewards_coefficient", 0.5),
        ("split_shared_prefix", False),
        ("average_epochs", False),
    ],
)
def test_reward_settings_are_refused_on_a_classification_job(
    client: TestClient, auth: Headers, setting: str, value: Any
) -> None:
    """They were accepted and ignored: a classifier's loss reads none of them."""
    body = job_body(create_dataset(client, auth))
    body["method"]["hyperparameters"][setting] = value
    param = f"method.hyperparameters.{setting}"
    error = assert_error(
        client.post(JOBS, json=body, headers=auth), 422, param=param, code="setting_not_read"
    )
    assert "reward models" in error["message"] and "classification" in error["message"]
    prefs = create_dataset(client, auth, [{"chosen": "a", "rejected": "b"}] * 4, kind="preference")
    body["training_file"] = prefs  # a reward model reads it
    assert client.post(JOBS, json=body, headers=auth).status_code == 200


def test_unknown_model_is_404(client: TestClient, auth: Headers) -> None:
    train = create_dataset(client, auth)
    resp = client.post(JOBS, json=job_body(train, model="gpt-17"), headers=auth)
    assert_error(resp, 404, param="model", code="model_not_found")


def test_duplicate_adapter_name_of_active_job_is_409(client: TestClient, auth: Headers) -> None:
    train = create_dataset(client, auth)
    _create(client, auth, job_body(train, adapter_name="mine"))
    resp = client.post(JOBS, json=job_body(train, adapter_name="mine"), headers=auth)
    assert_error(resp, 409, param="adapter_name", code="adapter_name_taken")


def test_duplicate_adapter_name_of_existing_adapter_is_409(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    with db() as session:
        session.add(adapter_row(tenant_id_by_name(db), "taken"))
        session.commit()
    train = create_dataset(client, auth)
    resp = client.post(JOBS, json=job_body(train, adapter_name="taken"), headers=auth)
    assert_error(resp, 409, param="adapter_name", code="adapter_name_taken")


def test_name_is_free_again_after_cancel_and_per_tenant(
    client: TestClient, auth: Headers, other_auth: Headers
) -> None:
    train = create_dataset(client, auth)
    job = _create(client, auth, job_body(train, adapter_name="reuse"))
    client.post(f"{JOBS}/{job['id']}/cancel", headers=auth)
    _create(client, auth, job_body(train, adapter_name="reuse"))
    # Another tenant's names never collide with ours.
    theirs = create_dataset(client, other_auth)
    _create(client, other_auth, job_body(theirs, adapter_name="reuse"))


def test_concurrent_job_quota_is_429(client: TestClient, auth: Headers) -> None:
    app_state(client.app).settings.max_concurrent_jobs_per_tenant = 2
    train = create_dataset(client, auth)
    jobs = [_create(client, auth, job_body(train)) for _ in range(2)]
    resp = client.post(JOBS, json=job_body(train), headers=auth)
    assert_error(resp, 429, code="concurrent_jobs_limit", type="rate_limit_error")
    client.post(f"{JOBS}/{jobs[0]['id']}/cancel", headers=auth)
    _create(client, auth, job_body(train))


def test_queued_job_quota_is_429_and_running_jobs_do_not_count(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    settings = app_state(client.app).settings
    settings.max_concurrent_jobs_per_tenant = 10
    settings.max_queued_jobs_per_tenant = 2
    train = create_dataset(client, auth)
    for _ in range(2):
        _create(client, auth, job_body(train))
    resp = client.post(JOBS, json=job_body(train), headers=auth)
    assert_error(resp, 429, code="queued_jobs_limit", type="rate_limit_error")
    assert "2 jobs waiting in the queue (limit 2)" in resp.json()["error"]["message"]
    with db() as session:
        assert queue.claim_next_job(session, "w1", 30) is not None
    _create(client, auth, job_body(train))  # one started: room for one more in the queue


def test_a_job_planned_past_max_job_steps_is_refused(client: TestClient, auth: Headers) -> None:
    # 20 rows, 10 per label: the 10 % hold-out takes 1 of each, 18 train; batch_size 1 and
    # 1,000 epochs plan 18,000 steps, the trainer's arithmetic.
    train = create_dataset(client, auth, sentiment_rows(20))
    body = job_body(train)
    body["method"]["hyperparameters"] = {"n_epochs": 1000, "batch_size": 1}
    settings = app_state(client.app).settings
    settings.max_job_steps = 17_999
    resp = client.post(JOBS, json=body, headers=auth)
    error = assert_error(
        resp, 422, code="job_steps_limit_exceeded", param="method.hyperparameters.n_epochs"
    )
    assert "would train for 18,000 optimizer steps" in error["message"]
    assert "the limit is 17,999 steps" in error["message"]
    body["method"]["hyperparameters"] = {"max_steps": 18_000}
    assert_error(
        client.post(JOBS, json=body, headers=auth),
        422,
        code="job_steps_limit_exceeded",
        param="method.hyperparameters.max_steps",
    )
    assert client.get(JOBS, headers=auth).json()["data"] == []  # nothing was left behind
    settings.max_job_steps = 18_000  # exactly the plan: accepted
    body["method"]["hyperparameters"] = {"n_epochs": 1000, "batch_size": 1}
    assert _create(client, auth, body)["status"] == "queued"


def test_adapter_quota_is_429(client: TestClient, auth: Headers, db: sessionmaker[Session]) -> None:
    app_state(client.app).settings.max_adapters_per_tenant = 2
    with db() as session:
        session.add(adapter_row(tenant_id_by_name(db), "one"))
        session.commit()
    train = create_dataset(client, auth)
    _create(client, auth, job_body(train))  # 1 adapter + this job = 2
    assert_error(client.post(JOBS, json=job_body(train), headers=auth), 429, code="adapter_limit")


def test_adapter_byte_quota_is_429_at_job_creation(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    # The new adapter's size is unknown until trained: refused once the usage reaches the limit.
    app_state(client.app).settings.max_adapter_bytes_per_tenant = 64
    with db() as session:
        session.add(adapter_row(tenant_id_by_name(db), "one", size_bytes=64))
        session.commit()
    resp = client.post(JOBS, json=job_body(create_dataset(client, auth)), headers=auth)
    assert_error(resp, 429, code="adapter_bytes_limit", contains="adapters use 64 B of 64 B")
    assert client.get(JOBS, headers=auth).json()["data"] == []
    app_state(client.app).settings.max_adapter_bytes_per_tenant = 65
    _create(client, auth, job_body(create_dataset(client, auth)))


def test_cancel_queued_job_is_immediate(client: TestClient, auth: Headers) -> None:
    job = _create(client, auth, job_body(create_dataset(client, auth)))
    resp = client.post(f"{JOBS}/{job['id']}/cancel", headers=auth)
    assert resp.status_code == 200
    assert resp.json()["status"] == "cancelled" and resp.json()["finished_at"] is not None


def test_cancel_running_job_requests_cancellation(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    job = _create(client, auth, job_body(create_dataset(client, auth)))
    with db() as session:
        claimed = queue.claim_next_job(session, "w1", 30)
        assert claimed is not None and claimed.id == job["id"]
    resp = client.post(f"{JOBS}/{job['id']}/cancel", headers=auth)
    assert resp.json()["status"] == "cancel_requested"
    with db() as session:
        assert queue.is_cancel_requested(session, job["id"])
    # Asking again is harmless.
    assert client.post(f"{JOBS}/{job['id']}/cancel", headers=auth).json()["status"] == (
        "cancel_requested"
    )
    with db() as session:
        row = session.get(Job, job["id"])
        assert row is not None
        finish_cancelled(session, row, worker_id="w1")
    assert client.get(f"{JOBS}/{job['id']}", headers=auth).json()["status"] == "cancelled"


def test_cancel_terminal_job_is_409(client: TestClient, auth: Headers) -> None:
    job = _create(client, auth, job_body(create_dataset(client, auth)))
    client.post(f"{JOBS}/{job['id']}/cancel", headers=auth)
    error = assert_error(
        client.post(f"{JOBS}/{job['id']}/cancel", headers=auth), 409, code="job_not_cancellable"
    )
    assert "cancelled" in error["message"]


def test_cancel_succeeded_job_is_409(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    job = _create(client, auth, job_body(create_dataset(client, auth), adapter_name="done"))
    with db() as session:
        claimed = queue.claim_next_job(session, "w1", 30)
        assert claimed is not None
        finish_success(
            session, claimed, adapter_row(claimed.tenant_id, "", version=None), worker_id="w1"
        )
    body = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert body["status"] == "succeeded" and body["fine_tuned_adapter"] == "done"
    assert body["fine_tuned_model"] == "done"
    assert_error(client.post(f"{JOBS}/{job['id']}/cancel", headers=auth), 409)


def test_jobs_are_tenant_isolated(client: TestClient, auth: Headers, other_auth: Headers) -> None:
    job = _create(client, auth, job_body(create_dataset(client, auth)))
    for path in ("", "/events", "/checkpoints"):
        assert_error(
            client.get(f"{JOBS}/{job['id']}{path}", headers=other_auth), 404, code="job_not_found"
        )
    assert_error(client.post(f"{JOBS}/{job['id']}/cancel", headers=other_auth), 404)
    assert client.get(JOBS, headers=other_auth).json()["data"] == []
    assert client.get(f"{JOBS}/{job['id']}", headers=auth).json()["status"] == "queued"


def test_job_list_cursor_pagination(client: TestClient, auth: Headers) -> None:
    app_state(client.app).settings.max_concurrent_jobs_per_tenant = 10
    train = create_dataset(client, auth)
    ids = [_create(client, auth, job_body(train))["id"] for _ in range(5)][::-1]
    seen: list[str] = []
    after: str | None = None
    while True:
        url = f"{JOBS}?limit=2" + (f"&after={after}" if after else "")
        page = client.get(url, headers=auth).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == ids


def test_events_pagination_and_order(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    job = _create(client, auth, job_body(create_dataset(client, auth)))
    with db() as session:
        row = session.get(Job, job["id"])
        assert row is not None
        for i in range(5):
            add_event(session, row, f"step {i}", type="metrics", data={"step": i})
        session.commit()
    url = f"{JOBS}/{job['id']}/events"
    page = client.get(f"{url}?limit=3", headers=auth).json()
    assert [e["message"] for e in page["data"]] == ["step 4", "step 3", "step 2"]
    assert page["has_more"] is True and page["data"][0]["data"] == {"step": 4}
    page2 = client.get(f"{url}?limit=3&after={page['data'][-1]['id']}", headers=auth).json()
    assert [e["message"] for e in page2["data"]] == ["step 1", "step 0", QUEUED_HOLDING_OUT]
    assert page2["has_more"] is True
    page3 = client.get(f"{url}?limit=3&after={page2['last_id']}", headers=auth).json()
    assert [e["message"] for e in page3["data"]] == [
        f"Validating training file: {job['training_file']}"
    ]
    assert page3["has_more"] is False
    asc = client.get(f"{url}?order=asc&limit=2", headers=auth).json()
    assert asc["data"][0]["message"].startswith("Validating")
    assert_error(client.get(f"{url}?after=bogus", headers=auth), 422, param="after")


def test_events_stored_with_old_values_read_as_openai_s(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    """Migration 0009 rewrote them; one a process on the old code writes meanwhile (a rolling
    upgrade) reads with OpenAI's level and type too, rather than failing the page."""
    job = _create(client, auth, job_body(create_dataset(client, auth)))
    with db() as session:
        row = session.get(Job, job["id"])
        assert row is not None
        add_event(session, row, "Job requeued: worker shutting down", level="warning")
        add_event(session, row, "Checkpoint saved at step 4", type="checkpoint", data={"step": 4})
        session.commit()
    events = client.get(f"{JOBS}/{job['id']}/events", headers=auth).json()["data"]
    for event in events:
        FineTuningJobEvent.model_validate(event)
    assert [(e["level"], e["type"], e["data"]) for e in events[:2]] == [
        ("info", "message", {"step": 4}),
        ("warn", "message", None),
    ]


def test_queued_event_says_when_training_rows_will_be_held_out(
    client: TestClient, auth: Headers
) -> None:
    train = create_dataset(client, auth)

    def queued_message(**hyper: Any) -> str:
        body = job_body(train)
        body["method"]["hyperparameters"] |= hyper
        job = _create(client, auth, body)
        client.post(f"{JOBS}/{job['id']}/cancel", headers=auth)  # frees the quota
        events = client.get(f"{JOBS}/{job['id']}/events?order=asc", headers=auth).json()
        message: str = events["data"][1]["message"]
        return message

    assert queued_message() == QUEUED_HOLDING_OUT
    assert queued_message(validation_fraction=0.25).startswith(
        "Files validated; job queued; no validation_file, so 25% of the training rows"
    )
    assert queued_message(validation_fraction=0) == "Files validated; job queued"


def test_checkpoints_listing_hides_state(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    job = _create(client, auth, job_body(create_dataset(client, auth), adapter_name="ck"))
    with db() as session:
        claimed = queue.claim_next_job(session, "w1", 30)
        assert claimed is not None
        for step in (10, 20):
            save_checkpoint(
                session,
                claimed,
                worker_id="w1",
                step=step,
                epoch=step / 20,
                metrics={"loss": 1 / step},
                state=b"STATE" * 10,
            )
    page = client.get(f"{JOBS}/{job['id']}/checkpoints", headers=auth).json()
    assert [c["step_number"] for c in page["data"]] == [20, 10]
    first = page["data"][0]
    assert first["object"] == "fine_tuning.job.checkpoint"
    assert first["fine_tuning_job_id"] == job["id"]
    assert first["fine_tuned_model_checkpoint"] == "ck:ckpt-step-20"
    assert first["metrics"] == {"loss": 0.05} and first["epoch"] == 1.0
    assert "state" not in first and "STATE" not in str(page)


def test_progress_is_reported(client: TestClient, auth: Headers, db: sessionmaker[Session]) -> None:
    job = _create(client, auth, job_body(create_dataset(client, auth)))
    with db() as session:
        assert queue.claim_next_job(session, "w1", 30) is not None
        assert queue.report_progress(
            session,
            job["id"],
            "w1",
            30,
            step=5,
            total_steps=50,
            epoch=0.1,
            metrics={"train_loss": 0.7},
            trained_tokens=1000,
        )
    body = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert body["status"] == "running" and body["started_at"] is not None
    assert body["progress"] == {"step": 5, "total_steps": 50, "epoch": 0.1}
    assert body["metrics"] == {"train_loss": 0.7} and body["trained_tokens"] == 1000


def test_preference_jobs_accept_preference_files(
    client: TestClient, auth: Headers, new_tenant: Callable[[str], Headers]
) -> None:
    prefs = create_dataset(client, auth, [{"chosen": "a", "rejected": "b"}], kind="preference")
    job = _create(client, auth, job_body(prefs, validation_file=prefs))
    assert job["status"] == "queued"


def test_a_job_stored_before_the_echo_columns_echoes_as_it_did(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    """Rows from before migration 0008 have no OpenAI method type nor reference adapter name:
    their method echoes the stored block, the pinned reference's id included."""
    job = _create(client, auth, job_body(create_dataset(client, auth)))
    stored = {"type": "lora", "lora": {"r": 8}, "reference_adapter": "adapter-0123"}
    with db() as session:
        row = session.get(Job, job["id"])
        assert row is not None
        assert (row.openai_method, row.reference_adapter_name) == (None, None)
        row.method = stored
        session.commit()
    echoed = client.get(f"{JOBS}/{job['id']}", headers=auth).json()["method"]
    assert echoed == {**stored, "hyperparameters": {"n_epochs": 1}}
