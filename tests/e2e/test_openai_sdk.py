"""The official OpenAI Python SDK against a real ``loraplex serve`` over real HTTP.

Only the ``openai`` package talks to the OpenAI-shaped surface (files, fine-tuning jobs,
models); loraplex's own ``/predict`` is called with httpx. The server is the shared
``live_server`` fixture (real MiniLM, embedded worker, SQLite in a temp dir).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai.types.fine_tuning import FineTuningJob

from tests.e2e.conftest import FIXTURES
from tests.e2e.server import REPO, ServerProcess, base_env

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TERMINAL = {"succeeded", "failed", "cancelled"}
JOB_TIMEOUT_S = 300.0
SMALL_LORA = {
    "type": "lora",
    "lora": {"r": 4},
    "hyperparameters": {"n_epochs": 1, "max_steps": 20, "batch_size": 16, "learning_rate": 2e-3},
}


def sdk_client(server: ServerProcess, key: str | None = None) -> openai.OpenAI:
    # The SDK's defaults (2 retries with back-off), as users run it: the 409s and 429s these
    # tests provoke say x-should-retry: false, so each is answered at once.
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key or server.api_key)


@pytest.fixture(scope="module")
def client(live_server: ServerProcess) -> Iterator[openai.OpenAI]:
    with sdk_client(live_server) as c:
        yield c


@pytest.fixture(scope="module")
def training_file(client: openai.OpenAI) -> str:
    lines = (FIXTURES / "rotten_tomatoes_small.jsonl").read_bytes().splitlines()[:200]
    file = client.files.create(file=("rt-train.jsonl", b"\n".join(lines)), purpose="fine-tune")
    return file.id


def tenant_key(server: ServerProcess, tenant: str) -> str:
    """A key for another tenant, made with the CLI on the server's own database."""
    out = subprocess.run(
        [sys.executable, "-m", "service", "admin", "create-key", "--tenant", tenant],
        cwd=REPO,
        env=base_env(server.data_dir, **server.settings),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def wait_for(
    client: openai.OpenAI, job_id: str, timeout: float = JOB_TIMEOUT_S
) -> tuple[FineTuningJob, list[str]]:
    """Poll until the job ends, printing new events as they come; all its events, oldest first.

    Events are listed newest first (as OpenAI does); auto-pagination walks all of them.
    """
    deadline = time.monotonic() + timeout
    shown: set[str] = set()
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        latest = client.fine_tuning.jobs.list_events(job_id, limit=10).data
        for event in reversed(latest):
            if event.id not in shown:
                shown.add(event.id)
                print(f"  {job_id} {event.level}: {event.message}")
        if job.status in TERMINAL:
            events = list(client.fine_tuning.jobs.list_events(job_id, limit=20))
            return job, [e.message for e in reversed(events)]
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job.status} after {timeout:.0f} s")
        time.sleep(0.5)


# --- works without training --------------------------------------------------------------------


def test_files_round_trip(client: openai.OpenAI, training_file: str) -> None:
    file = client.files.retrieve(training_file)
    assert file.object == "file" and file.purpose == "fine-tune" and file.status == "processed"
    assert file.filename == "rt-train.jsonl" and file.bytes > 0
    assert file.model_extra and file.model_extra["kind"] == "classification"
    assert file.model_extra["row_count"] == 200
    assert training_file in {f.id for f in client.files.list()}
    rows = client.files.content(training_file).text.splitlines()
    assert len(rows) == 200 and set(json.loads(rows[0])) >= {"text", "label"}

    scratch = client.files.create(
        file=("prefs.jsonl", b'{"chosen": "yes", "rejected": "no"}\n'), purpose="fine-tune"
    )
    assert scratch.model_extra and scratch.model_extra["kind"] == "preference"
    assert client.files.delete(scratch.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(scratch.id)


def test_models_list_the_base(client: openai.OpenAI) -> None:
    models = list(client.models.list())
    assert models[0].id == BASE_MODEL and models[0].owned_by == "system"
    base = client.models.retrieve(BASE_MODEL)  # a slash in the id, percent-encoded
    assert base.id == BASE_MODEL and base.model_extra
    assert base.model_extra["hidden_size"] == 384 and base.model_extra["num_layers"] == 6


def test_error_classes(
    live_server: ServerProcess, client: openai.OpenAI, training_file: str
) -> None:
    with (
        sdk_client(live_server, key="lpx_not-a-key") as stranger,
        pytest.raises(openai.AuthenticationError),
    ):
        stranger.files.list()
    with pytest.raises(openai.NotFoundError) as missing:
        client.fine_tuning.jobs.retrieve("ftjob-000000000000000000000000")
    assert missing.value.code == "job_not_found"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=training_file)
    with pytest.raises(openai.BadRequestError) as bad:
        client.files.create(file=("x.jsonl", b'{"text": "a", "label": 1}\n'), purpose="batch")
    assert bad.value.code == "unsupported_purpose"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(
            model=BASE_MODEL, training_file=training_file, method={"type": "reinforcement"}
        )
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        client.fine_tuning.jobs.create(
            model=BASE_MODEL,
            training_file=training_file,
            method={"type": "lora", "lora": {"r": 0}},  # type: ignore[typeddict-item,misc]
        )
    assert invalid.value.param == "method.lora.r"


def test_rate_limit_is_a_rate_limit_error(live_server: ServerProcess) -> None:
    """A fresh tenant fills its concurrent-job quota (4 by default) and gets a 429."""
    with sdk_client(live_server, tenant_key(live_server, "quota")) as quota:
        lines = (FIXTURES / "rotten_tomatoes_small.jsonl").read_bytes().splitlines()[:50]
        file = quota.files.create(file=("q.jsonl", b"\n".join(lines)), purpose="fine-tune")
        created: list[str] = []
        try:
            with pytest.raises(openai.RateLimitError) as limited:
                for _ in range(10):
                    job = quota.fine_tuning.jobs.create(
                        model=BASE_MODEL,
                        training_file=file.id,
                        method=SMALL_LORA,  # type: ignore[arg-type]
                    )
                    created.append(job.id)
            assert limited.value.code == "concurrent_jobs_limit" and len(created) >= 1
        finally:
            for job_id in created:
                if quota.fine_tuning.jobs.retrieve(job_id).status not in TERMINAL:
                    quota.fine_tuning.jobs.cancel(job_id)
            for job_id in created:
                wait_for(quota, job_id, timeout=120)


# --- needs the worker and /predict -----------------------------------------------------------


def test_lora_job_trains_lists_and_predicts(
    live_server: ServerProcess, client: openai.OpenAI, training_file: str
) -> None:
    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL,
        training_file=training_file,
        suffix="sdk",
        seed=1,
        method=SMALL_LORA,  # type: ignore[arg-type]
    )
    assert job.status == "queued" and job.object == "fine_tuning.job"
    assert job.organization_id and job.result_files == []
    done, events = wait_for(client, job.id)
    assert done.status == "succeeded", (done.error, events, live_server.log_tail())
    assert done.fine_tuned_model and done.fine_tuned_model.startswith("lora-sdk-")
    assert done.finished_at and done.finished_at >= done.created_at
    assert events[0].startswith("Validating training file")
    assert any(e.startswith("Job succeeded") for e in events)
    assert job.id in {j.id for j in client.fine_tuning.jobs.list()}
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert all(c.fine_tuning_job_id == job.id for c in checkpoints)

    name = done.fine_tuned_model
    model = next(m for m in client.models.list() if m.id == name)
    assert model.model_extra and model.model_extra["parent"] == BASE_MODEL
    assert client.models.retrieve(name).id == name

    headers = {"Authorization": f"Bearer {live_server.api_key}"}
    resp = httpx.post(
        f"{live_server.base_url}/predict",
        params={"adapter": name},
        json={"inputs": ["a moving, beautiful film", "a dull, lifeless mess"]},
        headers=headers,
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    predictions = resp.json()["predictions"]
    assert len(predictions) == 2 and all(p["label"] in {"fresh", "rotten"} for p in predictions)

    # Another tenant sees nothing of it.
    with sdk_client(live_server, tenant_key(live_server, "outsider")) as outsider:
        with pytest.raises(openai.NotFoundError):
            outsider.models.retrieve(name)
        assert name not in {m.id for m in outsider.models.list()}
        with pytest.raises(openai.NotFoundError):
            outsider.fine_tuning.jobs.retrieve(job.id)


def test_cancel_a_job(client: openai.OpenAI, training_file: str) -> None:
    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL,
        training_file=training_file,
        method={"type": "lora", "hyperparameters": {"n_epochs": 20}},  # type: ignore[typeddict-item,misc]
    )
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    # Queued: cancelled at once. Already claimed: asked to stop at the next step.
    assert cancelled.status in {"cancelled", "cancel_requested"}
    done, events = wait_for(client, job.id, timeout=120)
    assert done.status == "cancelled", events
    assert done.fine_tuned_model is None
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)
