"""The official ``openai`` SDK against the app in process (its HTTP client is the TestClient).

Every call goes through the SDK's own request building, pagination and response parsing, so
these tests fail if loraplex answers anything the SDK cannot read or sends the wrong error
class. ``tests/e2e/test_openai_sdk.py`` does the same over real HTTP with training.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types import FileObject, Model
from openai.types.fine_tuning import (
    DpoHyperparameters,
    FineTuningJob,
    FineTuningJobEvent,
    SupervisedHyperparameters,
)
from openai.types.fine_tuning.fine_tuning_job import (
    Hyperparameters as FineTuningJobHyperparameters,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.base import FrozenBase
from service.config import Settings
from service.db.models import Job, Tenant
from service.db.types import utcnow
from service.jobs import queue
from service.jobs.checkpoints import save_checkpoint
from service.jobs.outcomes import finish_cancelled, finish_success
from service.main import create_app
from service.state import app_state
from service.worker.job_run import RunOutcome
from tests.service.helpers import (
    CLASSIFICATION_ROWS,
    Headers,
    adapter_row,
    claimed_run,
    serve_base,
)

PREFERENCES = [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "capital of France?", "chosen": "Paris", "rejected": "Lyon"},
]


@pytest.fixture
def client(settings: Settings, tiny_base: FrozenBase) -> Iterator[TestClient]:
    settings.base_model_name = tiny_base.name
    settings.bases = [tiny_base.name]
    settings.max_concurrent_jobs_per_tenant = 10
    with TestClient(create_app(settings, hooks=[serve_base(tiny_base)])) as test_client:
        yield test_client


def _sdk(client: TestClient, headers: Headers, max_retries: int = 0) -> openai.OpenAI:
    key = headers["Authorization"].removeprefix("Bearer ")
    # No retries by default: a retried 503 would only slow the error tests down.
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=max_retries
    )


@pytest.fixture
def sdk(client: TestClient, auth: Headers) -> openai.OpenAI:
    return _sdk(client, auth)


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _upload(sdk: openai.OpenAI, rows: list[dict[str, Any]] | None = None) -> FileObject:
    return sdk.files.create(
        file=("train.jsonl", _jsonl(rows or CLASSIFICATION_ROWS)), purpose="fine-tune"
    )


# --- files -----------------------------------------------------------------------------------


def test_files_lifecycle(sdk: openai.OpenAI) -> None:
    created = _upload(sdk)
    assert isinstance(created, FileObject)
    assert created.purpose == "fine-tune" and created.status == "processed"
    assert created.filename == "train.jsonl" and created.bytes > 0
    assert created.model_extra == {
        "kind": "classification",
        "row_count": 4,
        "label_counts": {"neg": 2, "pos": 2},
    }
    prefs = _upload(sdk, PREFERENCES)
    assert prefs.model_extra and prefs.model_extra["kind"] == "preference"
    # The extra form field ``kind`` goes in extra_body.
    forced = sdk.files.create(
        file=("p.jsonl", _jsonl(PREFERENCES)),
        purpose="fine-tune",
        extra_body={"kind": "preference"},
    )
    assert forced.model_extra and forced.model_extra["kind"] == "preference"

    assert sdk.files.retrieve(created.id).id == created.id
    rows = [json.loads(line) for line in sdk.files.content(created.id).text.splitlines()]
    assert rows == CLASSIFICATION_ROWS
    # Auto-pagination walks has_more/after page by page.
    listed = [f.id for f in sdk.files.list(limit=1)]
    assert listed == [forced.id, prefs.id, created.id]
    assert [f.id for f in sdk.files.list(order="asc", limit=2)] == listed[::-1]

    deleted = sdk.files.delete(created.id)
    assert deleted.id == created.id and deleted.deleted is True
    with pytest.raises(openai.NotFoundError) as info:
        sdk.files.retrieve(created.id)
    assert info.value.code == "file_not_found"


# --- fine-tuning jobs ------------------------------------------------------------------------


def test_supervised_job_maps_onto_lora(sdk: openai.OpenAI, tiny_base: FrozenBase) -> None:
    file = _upload(sdk)
    job = sdk.fine_tuning.jobs.create(
        model=tiny_base.name,
        training_file=file.id,
        validation_file=file.id,
        suffix="sdk",
        seed=7,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": 2,
                    "batch_size": "auto",
                    "learning_rate_multiplier": 2,
                }
            },
        },
    )
    assert isinstance(job, FineTuningJob)
    assert job.object == "fine_tuning.job" and job.status == "queued"
    assert job.model == tiny_base.name and job.seed == 7
    assert job.training_file == file.id and job.validation_file == file.id
    assert job.organization_id.startswith("tenant-") and job.result_files == []
    assert job.fine_tuned_model is None and job.error is None
    assert job.hyperparameters.n_epochs == 2
    # The multiplier as sent, as method.supervised.hyperparameters shows it; the learning rate
    # it maps onto beside it.
    assert job.hyperparameters.learning_rate_multiplier == 2.0
    extra = job.model_extra or {}
    assert job.hyperparameters.model_extra == {"learning_rate": pytest.approx(2e-3)}
    assert extra["adapter_name"].startswith("lora-sdk-")
    # The method comes back as OpenAI's, what it trains (LoRA) beside it.
    for echoed in (job, sdk.fine_tuning.jobs.retrieve(job.id), *sdk.fine_tuning.jobs.list()):
        method = echoed.method
        assert method is not None and method.type == "supervised"
        assert method.supervised is not None and method.dpo is None
        assert method.supervised.hyperparameters == SupervisedHyperparameters(
            n_epochs=2, batch_size="auto", learning_rate_multiplier=2.0
        )
        assert method.model_extra == {
            "lora": {},
            "hyperparameters": {"n_epochs": 2, "learning_rate": pytest.approx(2e-3)},
        }


def test_a_started_job_shows_the_values_it_trains_with(
    sdk: openai.OpenAI, settings: Settings, db: sessionmaker[Session], tiny_base: FrozenBase
) -> None:
    file = _upload(sdk, [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(20)])
    job = sdk.fine_tuning.jobs.create(
        model=tiny_base.name,
        training_file=file.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    # Not sent, not resolved yet.
    assert job.hyperparameters.batch_size is None
    assert job.hyperparameters.learning_rate_multiplier is None
    assert claimed_run(db, settings, tiny_base).run() == RunOutcome.SUCCEEDED
    done = sdk.fine_tuning.jobs.retrieve(job.id)
    assert done.hyperparameters.batch_size == 16 and done.hyperparameters.n_epochs == 2
    assert done.hyperparameters.learning_rate_multiplier == 1.0
    # OpenAI's method block shows the values used too, as OpenAI's job object does.
    assert done.method is not None and done.method.supervised is not None
    assert done.method.supervised.hyperparameters == SupervisedHyperparameters(
        n_epochs=2, batch_size=16, learning_rate_multiplier=1.0
    )
    assert isinstance(done.trained_tokens, int) and done.trained_tokens > 0
    extra = done.model_extra or {}
    assert extra["resolved_hyperparameters"]["held_out_examples"] == 2
    assert extra["progress"] == {"step": 4, "total_steps": 4, "epoch": 2.0}


@pytest.mark.parametrize("validation_fraction", [0.1, 0], ids=["held-out", "none"])
def test_checkpoint_metrics_carry_openai_s_names(
    sdk: openai.OpenAI,
    settings: Settings,
    db: sessionmaker[Session],
    tiny_base: FrozenBase,
    validation_fraction: float,
) -> None:
    """Every OpenAI field of a checkpoint's metrics read None through the SDK, and without
    validation the training loss was labelled ``val_train_loss``."""
    file = _upload(sdk, [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(20)])
    hyper = {"n_epochs": 2, "validation_fraction": validation_fraction}
    job = sdk.fine_tuning.jobs.create(
        model=tiny_base.name,
        training_file=file.id,
        method={"type": "lora", "hyperparameters": hyper},  # type: ignore[typeddict-item,misc]
    )
    assert claimed_run(db, settings, tiny_base).run() == RunOutcome.SUCCEEDED
    # 2 epochs of 2 steps: the end of the first is checkpointed (the last step is the adapter).
    (ckpt,) = sdk.fine_tuning.jobs.checkpoints.list(job.id)
    metrics = ckpt.metrics
    assert ckpt.step_number == 2 and metrics.step == 2.0
    assert isinstance(metrics.train_loss, float) and metrics.train_loss > 0
    extra = metrics.model_extra or {}
    assert "val_train_loss" not in extra
    # Token accuracy is a chat job's.
    assert metrics.train_mean_token_accuracy is None and metrics.valid_mean_token_accuracy is None
    if validation_fraction:
        assert metrics.valid_loss == metrics.full_valid_loss == extra["val_loss"]
        assert isinstance(metrics.valid_loss, float)
        assert 0 <= extra["val_accuracy"] <= 1 and "val_macro_f1" in extra
    else:
        assert metrics.valid_loss is None and metrics.full_valid_loss is None
        assert extra == {}


def test_a_checkpoint_stored_before_openai_s_names_reads_with_them(
    sdk: openai.OpenAI, db: sessionmaker[Session], tiny_base: FrozenBase
) -> None:
    """Rows the worker wrote before hold the training loss as ``val_train_loss``."""
    job = sdk.fine_tuning.jobs.create(model=tiny_base.name, training_file=_upload(sdk).id)
    with db() as session:
        claimed = queue.claim_next_job(session, "w1", 30)
        assert claimed is not None and claimed.id == job.id
        old = {"val_train_loss": 0.5, "val_loss": 0.4, "val_accuracy": 0.75}
        save_checkpoint(
            session, claimed, worker_id="w1", step=6, epoch=1.0, state=b"S", metrics=old
        )
    (ckpt,) = sdk.fine_tuning.jobs.checkpoints.list(job.id)
    assert (ckpt.metrics.step, ckpt.metrics.train_loss) == (6.0, 0.5)
    assert ckpt.metrics.model_extra == {"val_loss": 0.4, "val_accuracy": 0.75}


@pytest.mark.parametrize(
    ("method_type", "multiplier", "learning_rate"),
    [("lora", 0.5, 5e-4), ("prompt_tuning", 2.0, 6e-2), ("full", 0.2, 1e-5)],
)
def test_the_job_s_hyperparameters_carry_the_learning_rate_multiplier(
    sdk: openai.OpenAI,
    tiny_base: FrozenBase,
    method_type: str,
    multiplier: float,
    learning_rate: float,
) -> None:
    """The job object's top-level hyperparameters carry OpenAI's learning_rate_multiplier: the
    learning rate over the method's default, the inverse of what a multiplier sent in the
    (deprecated) top-level block maps onto."""
    job = sdk.fine_tuning.jobs.create(
        model=tiny_base.name,
        training_file=_upload(sdk).id,
        method={"type": method_type},  # type: ignore[typeddict-item,misc]
        hyperparameters={"learning_rate_multiplier": multiplier},
    )
    for echoed in (job, sdk.fine_tuning.jobs.retrieve(job.id)):
        hyper = FineTuningJobHyperparameters.model_validate(echoed.hyperparameters.model_dump())
        assert hyper.learning_rate_multiplier == multiplier
        assert hyper.model_extra == {"learning_rate": pytest.approx(learning_rate)}
    # A learning rate sent as such reads as its multiplier too.
    sent = sdk.fine_tuning.jobs.create(
        model=tiny_base.name,
        training_file=_upload(sdk).id,
        method={  # type: ignore[typeddict-item,misc]
            "type": method_type,
            "hyperparameters": {"learning_rate": learning_rate},
        },
    )
    assert sent.hyperparameters.learning_rate_multiplier == multiplier


def test_loraplex_method_and_extra_body(sdk: openai.OpenAI, tiny_base: FrozenBase) -> None:
    file = _upload(sdk)
    job = sdk.fine_tuning.jobs.create(
        model=tiny_base.name,
        training_file=file.id,
        method={  # type: ignore[typeddict-item,misc]
            "type": "lora",
            "lora": {"r": 4, "target_modules": ["query", "value"]},
            "hyperparameters": {"n_epochs": 1, "max_steps": 20},
        },
        hyperparameters={"batch_size": 8},  # OpenAI's deprecated place: merged in
        extra_body={"adapter_name": "named-by-me"},
    )
    assert (job.model_extra or {})["adapter_name"] == "named-by-me"
    # loraplex's own method type echoes as sent, not in OpenAI's shape.
    for echoed in (job, sdk.fine_tuning.jobs.retrieve(job.id), *sdk.fine_tuning.jobs.list()):
        method = echoed.method
        assert method is not None and method.type == "lora"  # type: ignore[comparison-overlap]
        assert method.supervised is None and method.dpo is None
        assert method.model_extra == {
            "lora": {"r": 4, "target_modules": ["query", "value"]},
            "hyperparameters": {"n_epochs": 1, "max_steps": 20, "batch_size": 8},
        }


def test_dpo_trains_a_reward_model_on_preferences(
    sdk: openai.OpenAI, tiny_base: FrozenBase
) -> None:
    prefs = _upload(sdk, PREFERENCES)
    job = sdk.fine_tuning.jobs.create(
        model=tiny_base.name,
        training_file=prefs.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto", "n_epochs": 1}}},
    )
    assert job.status == "queued" and job.hyperparameters.n_epochs == 1
    for echoed in (job, sdk.fine_tuning.jobs.retrieve(job.id), *sdk.fine_tuning.jobs.list()):
        method = echoed.method
        assert method is not None and method.type == "dpo"
        assert method.dpo is not None and method.supervised is None
        assert method.dpo.hyperparameters == DpoHyperparameters(
            n_epochs=1, batch_size="auto", learning_rate_multiplier="auto", beta="auto"
        )
        assert method.model_extra == {"lora": {}, "hyperparameters": {"n_epochs": 1}}
    classification = _upload(sdk)
    with pytest.raises(openai.UnprocessableEntityError) as info:
        sdk.fine_tuning.jobs.create(
            model=tiny_base.name, training_file=classification.id, method={"type": "dpo"}
        )
    assert info.value.param == "training_file" and info.value.code == "dataset_kind_mismatch"
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.fine_tuning.jobs.create(
            model=tiny_base.name, training_file=prefs.id, method={"type": "supervised"}
        )
    # A reward model has no beta: a number is refused rather than ignored.
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        sdk.fine_tuning.jobs.create(
            model=tiny_base.name,
            training_file=prefs.id,
            method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}},
        )
    assert bad.value.param == "method.dpo.hyperparameters.beta"


def test_a_bad_openai_hyperparameter_is_named_where_it_was_sent(
    sdk: openai.OpenAI, tiny_base: FrozenBase
) -> None:
    """The SDK's blocks are moved into method.hyperparameters before the schema checks them;
    a 422 still names the path the client sent, and no job is left behind."""
    file = _upload(sdk)
    calls: list[tuple[dict[str, Any], str]] = [
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
            "method.supervised.hyperparameters.n_epochs",
        ),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": "many"}}}},
            "method.dpo.hyperparameters.batch_size",
        ),
        # The multiplier maps onto a learning rate past its bound (10): named as sent.
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"learning_rate_multiplier": 1e5}},
                }
            },
            "method.supervised.hyperparameters.learning_rate_multiplier",
        ),
        ({"hyperparameters": {"n_epochs": -2}}, "hyperparameters.n_epochs"),
        # Checked after the schema, by job creation: named where sent too.
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"max_steps": 10**7}},
                }
            },
            "method.supervised.hyperparameters.max_steps",  # the step limit
        ),
        (
            {"hyperparameters": {"warmup_ratio": 0.1, "warmup_steps": 3}},
            "hyperparameters.warmup_steps",  # core's cross-field rule
        ),
        (
            {"method": {"type": "supervised"}, "hyperparameters": {"beta": 0.1}},
            "hyperparameters.beta",  # a setting only DPO reads
        ),
        (
            {"method": {"type": "supervised", "hyperparameters": {"beta": 0.1}}},
            "method.hyperparameters.beta",
        ),
        # loraplex's own block keeps its path.
        (
            {"method": {"type": "lora", "hyperparameters": {"n_epochs": 0}}},
            "method.hyperparameters.n_epochs",
        ),
    ]
    for extra, param in calls:
        with pytest.raises(openai.UnprocessableEntityError) as info:
            sdk.fine_tuning.jobs.create(model=tiny_base.name, training_file=file.id, **extra)
        assert info.value.param == param, extra
    assert list(sdk.fine_tuning.jobs.list()) == []


def test_unsupported_openai_features_are_bad_requests(
    sdk: openai.OpenAI, tiny_base: FrozenBase
) -> None:
    file = _upload(sdk)
    calls: list[dict[str, Any]] = [
        {"method": {"type": "reinforcement"}},
        {"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]},
        {"metadata": {"team": "a"}},
    ]
    for extra in calls:
        with pytest.raises(openai.BadRequestError) as info:
            sdk.fine_tuning.jobs.create(model=tiny_base.name, training_file=file.id, **extra)
        assert info.value.type == "invalid_request_error"
        assert info.value.code in {"unsupported_method", "unsupported_parameter"}
    assert list(sdk.fine_tuning.jobs.list()) == []  # none of them left a job behind
    with pytest.raises(openai.BadRequestError) as purpose:
        sdk.files.create(file=("t.jsonl", _jsonl(CLASSIFICATION_ROWS)), purpose="assistants")
    assert purpose.value.code == "unsupported_purpose"


def test_jobs_list_retrieve_cancel_events_checkpoints(
    sdk: openai.OpenAI, tiny_base: FrozenBase, db: sessionmaker[Session]
) -> None:
    file = _upload(sdk)
    ids = [
        sdk.fine_tuning.jobs.create(model=tiny_base.name, training_file=file.id).id
        for _ in range(5)
    ]
    assert [j.id for j in sdk.fine_tuning.jobs.list(limit=2)] == ids[::-1]
    # No job has metadata (create refuses it), so a metadata filter matches none; ignored,
    # it listed them all.
    assert list(sdk.fine_tuning.jobs.list(metadata={"team": "x"})) == []
    assert sdk.fine_tuning.jobs.retrieve(ids[0]).id == ids[0]

    # A queued job is cancelled at once.
    cancelled = sdk.fine_tuning.jobs.cancel(ids[-1])
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None

    # A running one is asked to stop: loraplex's "cancel_requested" is no OpenAI status, but
    # the SDK's models do not validate, so it comes through as is.
    with db() as session:
        claimed = queue.claim_next_job(session, "w1", 30)
        assert claimed is not None and claimed.id == ids[0]
        save_checkpoint(
            session, claimed, worker_id="w1", step=5, epoch=0.5, state=b"S", metrics={"loss": 1}
        )
        # Given back by a worker shutting down, then lost by the next one: both requeue it.
        assert queue.release_job(session, claimed, worker_id="w1", reason="worker shutting down")
        claimed = queue.claim_next_job(session, "w1", 30)
        assert claimed is not None and claimed.id == ids[0]
        later = utcnow() + timedelta(seconds=31)
        assert queue.requeue_expired(session, now=later) == [ids[0]]
        claimed = queue.claim_next_job(session, "w1", 30)
        assert claimed is not None and claimed.id == ids[0]
    requested = sdk.fine_tuning.jobs.cancel(ids[0])
    assert requested.status == "cancel_requested"  # type: ignore[comparison-overlap]

    events = list(sdk.fine_tuning.jobs.list_events(ids[0], limit=2))
    # The SDK builds its objects without validating them: validated here, every event (the
    # checkpoint's, the requeue's, the lost worker's) has a level and a type it allows.
    for event in events:
        FineTuningJobEvent.model_validate(event.to_dict())
    messages = [e.message for e in events]
    assert messages[0].startswith("Cancellation requested")
    assert messages[-1].startswith("Validating training file")
    assert len(messages) == len(set(e.id for e in events)) >= 5
    levels = {e.message: e.level for e in events}
    assert levels["Job requeued: worker shutting down"] == "warn"
    assert levels["Worker lost (lease expired); job requeued, retry 1"] == "warn"
    (saved,) = [e for e in events if e.message.startswith("Checkpoint")]
    assert (saved.message, saved.type) == ("Checkpoint created at step 5", "message")

    checkpoints = list(sdk.fine_tuning.jobs.checkpoints.list(ids[0]))
    assert [c.step_number for c in checkpoints] == [5]
    assert saved.data == {"checkpoint_id": checkpoints[0].id, "step": 5, "epoch": 0.5}
    assert checkpoints[0].fine_tuning_job_id == ids[0]

    # Finished: the adapter is the fine-tuned model, and a model the SDK can retrieve.
    with db() as session:
        job = session.get(Job, ids[0])
        assert job is not None
        finish_cancelled(session, job, worker_id="w1")
    with db() as session:
        claimed = queue.claim_next_job(session, "w2", 30)
        assert claimed is not None
        adapter = adapter_row(claimed.tenant_id, "", version=None, base_model=tiny_base.name)
        finish_success(session, claimed, adapter, worker_id="w2")
    done = sdk.fine_tuning.jobs.retrieve(claimed.id)
    assert done.status == "succeeded" and done.fine_tuned_model
    model = sdk.models.retrieve(done.fine_tuned_model)
    assert model.id == done.fine_tuned_model and model.model_extra
    assert model.model_extra["parent"] == tiny_base.name


# --- models ----------------------------------------------------------------------------------


def test_models(
    sdk: openai.OpenAI, client: TestClient, other_auth: Headers, db: sessionmaker[Session]
) -> None:
    other = _sdk(client, other_auth)
    with db() as session:
        tenant_ids = {name: id_ for name, id_ in session.execute(select(Tenant.name, Tenant.id))}
        session.add(adapter_row(tenant_ids["default"], "mine"))
        session.add(adapter_row(tenant_ids["other"], "theirs"))
        session.commit()
    models = list(sdk.models.list())
    assert all(isinstance(m, Model) for m in models)
    base = models[0]
    assert base.owned_by == "system" and base.model_extra and base.model_extra["kind"] == "base"
    assert [m.id for m in models[1:]] == ["mine"]
    # The base id has a slash; the SDK percent-encodes it.
    assert sdk.models.retrieve(base.id).id == base.id
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("theirs")
    assert other.models.retrieve("theirs").id == "theirs"
    with pytest.raises(openai.PermissionDeniedError):
        sdk.models.delete(base.id)
    gone = sdk.models.delete("mine")
    assert gone.id == "mine" and gone.deleted is True
    assert [m.id for m in sdk.models.list()] == [base.id]


# --- errors ----------------------------------------------------------------------------------


def test_error_classes(sdk: openai.OpenAI, client: TestClient, tiny_base: FrozenBase) -> None:
    bad_key = openai.OpenAI(
        base_url="http://testserver/v1", api_key="lpx_nope", http_client=client, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as auth_error:
        bad_key.models.list()
    assert auth_error.value.code == "invalid_api_key"

    with pytest.raises(openai.NotFoundError):
        sdk.fine_tuning.jobs.retrieve("ftjob-missing")
    with pytest.raises(openai.NotFoundError) as model_error:
        sdk.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=_upload(sdk).id)
    assert model_error.value.param == "model"

    file = _upload(sdk)
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        sdk.fine_tuning.jobs.create(
            model=tiny_base.name,
            training_file=file.id,
            method={"type": "lora", "lora": {"r": 0}},  # type: ignore[typeddict-item,misc]
        )
    assert invalid.value.param == "method.lora.r"

    sdk.fine_tuning.jobs.create(
        model=tiny_base.name, training_file=file.id, extra_body={"adapter_name": "taken"}
    )
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.create(
            model=tiny_base.name, training_file=file.id, extra_body={"adapter_name": "taken"}
        )

    app_state(client.app).settings.max_concurrent_jobs_per_tenant = 1
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.fine_tuning.jobs.create(model=tiny_base.name, training_file=file.id)
    assert limited.value.code == "concurrent_jobs_limit"


def test_sdk_does_not_retry_a_conflict_or_a_full_quota(
    client: TestClient, auth: Headers, tiny_base: FrozenBase
) -> None:
    """With the SDK's default retries, a 409 or 429 is one request, not three."""
    sdk = _sdk(client, auth, max_retries=2)
    file = _upload(sdk)
    sdk.fine_tuning.jobs.create(
        model=tiny_base.name, training_file=file.id, extra_body={"adapter_name": "once"}
    )
    sent: list[str] = []
    client.event_hooks["request"].append(lambda request: sent.append(request.url.path))
    with pytest.raises(openai.ConflictError) as taken:
        sdk.fine_tuning.jobs.create(
            model=tiny_base.name, training_file=file.id, extra_body={"adapter_name": "once"}
        )
    assert taken.value.response.headers["x-should-retry"] == "false"
    app_state(client.app).settings.max_concurrent_jobs_per_tenant = 1
    with pytest.raises(openai.RateLimitError):
        sdk.fine_tuning.jobs.create(model=tiny_base.name, training_file=file.id)
    assert sent == ["/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs"]
