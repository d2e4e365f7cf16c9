"""Chat SFT and DPO jobs on a decoder base, end to end in one process on a tiny random Llama.

Jobs are created over HTTP (the service's own checks), claimed and trained by a real
``JobRun`` as ``loraplex worker`` runs them, and read back over HTTP: the task and the base come
from the training file, the adapter is stored on the decoder and loads back, SFT's adapter is
DPO's reference, a requeued job resumes where it stopped.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.decoder.base import DecoderBase, load_decoder_base
from service.adapters.store import adapter_from_row
from service.config import DEFAULT_BASE_MODEL_NAME, Settings
from service.db.models import AdapterRow, Job
from service.jobs import queue
from service.worker.job_run import JobRun, RunOutcome
from tests.core.decoder.tiny_llama import TINY_LLAMA_NAME
from tests.service.conftest import make_settings
from tests.service.helpers import ADMIN_KEY, Headers, assert_error, create_dataset, shutdown_at_step

JOBS = "/v1/fine_tuning/jobs"
# Short rows and windows: a step of the tiny model takes milliseconds.
HYPER = {"n_epochs": 1, "batch_size": 4, "max_seq_length": 64, "learning_rate": 1e-2}


def chat_rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        }
        for i in range(n)
    ]


def dpo_rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "input": {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"{2 * i}."}],
            "non_preferred_output": [{"role": "assistant", "content": f"{2 * i + 1}."}],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def decoder(tiny_llama_dir: Path) -> DecoderBase:
    return load_decoder_base(tiny_llama_dir, name=TINY_LLAMA_NAME, device="cpu")


@pytest.fixture
def settings(tmp_path: Path, db_backend: str, database_url: str, tiny_llama_dir: Path) -> Settings:
    """Both bases configured (jobs pick theirs); the tiny Llama is the decoder."""
    return make_settings(
        tmp_path,
        admin_key=ADMIN_KEY,
        database_url=database_url if db_backend == "postgres" else None,
        decoder_model_path=tiny_llama_dir,
        decoder_model_name=TINY_LLAMA_NAME,
        bases=[DEFAULT_BASE_MODEL_NAME, TINY_LLAMA_NAME],
    )


def run_next(
    db: sessionmaker[Session], settings: Settings, base: DecoderBase, cls: type[JobRun] = JobRun
) -> RunOutcome:
    with db() as session:
        job = queue.claim_next_job(session, "w1", settings.lease_seconds)
        assert job is not None
        session.expunge(job)
    run = cls(
        job, factory=db, base=base, settings=settings, worker_id="w1", shutdown=threading.Event()
    )
    return run.run()


def create_job(client: TestClient, auth: Headers, **body: Any) -> dict[str, Any]:
    resp = client.post(JOBS, json=body, headers=auth)
    assert resp.status_code == 200, resp.text
    job: dict[str, Any] = resp.json()
    return job


def rows_by_name(db: sessionmaker[Session]) -> dict[str, AdapterRow]:
    with db() as session:
        return {r.name: r for r in session.scalars(select(AdapterRow))}


def metrics_events(client: TestClient, auth: Headers, job_id: str) -> list[dict[str, Any]]:
    page = client.get(f"{JOBS}/{job_id}/events?order=asc&limit=100", headers=auth).json()
    return [e["data"] for e in page["data"] if e["type"] == "metrics"]


def test_chat_sft_then_dpo_with_the_sft_adapter_as_reference(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    settings: Settings,
    decoder: DecoderBase,
) -> None:
    chat = create_dataset(client, auth, chat_rows(12), kind="chat")
    chat_val = create_dataset(client, auth, chat_rows(3), kind="chat")
    method = {"type": "lora", "hyperparameters": HYPER}
    # No model: a chat file trains on the configured decoder.
    job = create_job(
        client, auth, training_file=chat, validation_file=chat_val, method=method, seed=1
    )
    assert job["model"] == TINY_LLAMA_NAME
    assert run_next(db, settings, decoder) is RunOutcome.SUCCEEDED
    job = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == job["adapter_name"]
    assert job["trained_tokens"] > 0
    assert job["resolved_hyperparameters"]["max_seq_length"] == 64
    events = metrics_events(client, auth, job["id"])
    steps = [e for e in events if "lr" in e]  # a step's event (validation's has no lr)
    assert [e["step"] for e in steps] == [1, 2, 3]  # 12 rows, batches of 4
    # OpenAI's names: train_loss is the step's loss, as in OpenAI's events; so is the loss
    # each event's message shows.
    assert all(e["train_loss"] == e["step_loss"] for e in steps)
    page = client.get(f"{JOBS}/{job['id']}/events?order=asc&limit=100", headers=auth).json()
    messages = [e["message"] for e in page["data"] if e["type"] == "metrics"]
    shown = [m for m in messages if m.startswith("Step ")]
    assert shown == [f"Step {e['step']}/3: training loss={e['train_loss']:.4f}" for e in steps]
    assert all(0 <= e["train_mean_token_accuracy"] <= 1 for e in steps)
    (valid,) = [e for e in events if "val_loss" in e]
    assert valid["valid_loss"] == valid["full_valid_loss"] == valid["val_loss"] > 0
    # The last step's event carries that validation too, as OpenAI's last step does.
    assert steps[-1]["valid_loss"] == valid["valid_loss"]
    assert 0 <= valid["valid_mean_token_accuracy"] <= 1
    assert steps[-1]["trained_tokens"] == job["trained_tokens"]

    sft = client.get(f"/v1/adapters/{job['adapter_name']}", headers=auth).json()
    assert (sft["task"], sft["method"], sft["base_model"]) == ("chat", "lora", TINY_LLAMA_NAME)
    with db() as session:
        row = session.scalar(select(AdapterRow).where(AdapterRow.name == sft["name"]))
        assert row is not None and row.base_fingerprint == decoder.fingerprint
        adapter = adapter_from_row(row)
    assert adapter.task == "chat" and adapter.method.target_modules
    adapter.load_method(decoder)  # the stored adapter loads back onto its base

    # DPO from the SFT adapter: its reference policy and starting weights.
    dpo = create_dataset(client, auth, dpo_rows(8), kind="dpo")
    dpo_method = {"type": "lora", "hyperparameters": {**HYPER, "beta": 0.2}}
    job = create_job(
        client, auth, training_file=dpo, method=dpo_method, reference_adapter=sft["name"], seed=1
    )
    # Echoed by the name sent; the adapter version the job pinned is beside it.
    assert job["method"]["reference_adapter"] == sft["name"]
    assert job["method"]["reference_adapter_id"] == sft["id"]
    assert job["method"]["type"] == "lora"  # loraplex's own type: echoed as sent
    # The queued job starts from the SFT adapter: deleting it would fail the job later.
    for path in (f"/v1/adapters/{sft['name']}", f"/v1/models/{sft['name']}"):
        assert_error(client.delete(path, headers=auth), 409, code="adapter_in_use")
    assert run_next(db, settings, decoder) is RunOutcome.SUCCEEDED
    job = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert job["status"] == "succeeded", job["error"]
    assert job["resolved_hyperparameters"]["beta"] == 0.2
    events = metrics_events(client, auth, job["id"])
    assert all("rewards/margins" in e for e in events if "train_loss" in e)
    assert any("val_rewards/accuracies" in e for e in events)
    stored = client.get(f"/v1/adapters/{job['adapter_name']}", headers=auth).json()
    assert (stored["task"], stored["base_model"]) == ("dpo", TINY_LLAMA_NAME)
    listed = client.get("/v1/adapters", headers=auth).json()["data"]
    assert {a["name"] for a in listed} == {sft["name"], stored["name"]}
    # The job has finished: its reference is free to go.
    assert client.delete(f"/v1/models/{sft['name']}", headers=auth).status_code == 200


def test_job_creation_checks_base_task_and_settings(
    client: TestClient, auth: Headers, other_auth: Headers
) -> None:
    chat = create_dataset(client, auth, chat_rows(4), kind="chat")
    dpo = create_dataset(client, auth, dpo_rows(4), kind="dpo")
    classification = create_dataset(client, auth)

    def refused(status: int, param: str, **body: Any) -> dict[str, Any]:
        return assert_error(client.post(JOBS, json=body, headers=auth), status, param=param)

    error = refused(422, "model", training_file=chat, model=DEFAULT_BASE_MODEL_NAME)
    assert "encoder" in error["message"] and "chat" in error["message"]
    # A classification or preference file trains on the decoder when model names it (the
    # encoder by default); OpenAI's names map as on the encoder: supervised trains a
    # classifier, dpo a reward model.
    preference = create_dataset(
        client, auth, [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4, kind="preference"
    )
    for file, openai in [(classification, "supervised"), (preference, "dpo")]:
        job = create_job(
            client, auth, training_file=file, model=TINY_LLAMA_NAME, method={"type": openai}
        )
        assert job["model"] == TINY_LLAMA_NAME
    refused(
        422,
        "training_file",
        training_file=classification,
        model=TINY_LLAMA_NAME,
        method={"type": "dpo"},
    )
    refused(
        422,
        "method.lora.target_modules",
        training_file=classification,
        model=TINY_LLAMA_NAME,
        method={"type": "lora", "lora": {"target_modules": ["query"]}},
    )
    refused(
        422,
        "method.hyperparameters.beta",
        training_file=chat,
        method={"type": "lora", "hyperparameters": {"beta": 0.2}},
    )
    refused(
        422,
        "method.hyperparameters.margin",
        training_file=dpo,
        method={"type": "lora", "hyperparameters": {"margin": 1.0}},
    )
    refused(422, "method.type", training_file=chat, method={"type": "adapter"})
    # An encoder's layer names are not a decoder's.
    refused(
        422,
        "method.lora.target_modules",
        training_file=chat,
        method={"type": "lora", "lora": {"target_modules": ["query"]}},
    )
    refused(422, "validation_file", training_file=chat, validation_file=dpo)
    refused(422, "reference_adapter", training_file=chat, reference_adapter="sft")
    refused(404, "reference_adapter", training_file=dpo, reference_adapter="sft")
    # OpenAI's dpo type with its beta, and the reference as an extra body field.
    openai_dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}
    refused(404, "reference_adapter", training_file=dpo, method=openai_dpo, reference_adapter="x")
    # OpenAI's supervised trains a chat file; its dpo does not.
    refused(422, "training_file", training_file=chat, method={"type": "dpo"})
    job = create_job(client, auth, training_file=chat, method={"type": "supervised"})
    assert job["model"] == TINY_LLAMA_NAME
    # Another tenant's chat file is not found.
    other_chat = create_dataset(client, other_auth, chat_rows(4), kind="chat")
    refused(404, "training_file", training_file=other_chat)


def test_a_chat_job_s_checkpoint_has_openai_s_token_accuracy(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    settings: Settings,
    decoder: DecoderBase,
) -> None:
    """A chat validation's accuracy is per token: OpenAI's ``valid_mean_token_accuracy``."""
    chat = create_dataset(client, auth, chat_rows(8), kind="chat")
    chat_val = create_dataset(client, auth, chat_rows(3), kind="chat")
    method = {"type": "lora", "hyperparameters": {**HYPER, "n_epochs": 2}}
    job = create_job(client, auth, training_file=chat, validation_file=chat_val, method=method)
    assert run_next(db, settings, decoder) is RunOutcome.SUCCEEDED
    page = client.get(f"{JOBS}/{job['id']}/checkpoints", headers=auth).json()
    (ckpt,) = page["data"]  # the end of the first epoch (2 steps of 4 rows)
    metrics = ckpt["metrics"]
    assert ckpt["step_number"] == 2 and metrics["step"] == 2.0 and metrics["train_loss"] > 0
    assert metrics["valid_loss"] == metrics["full_valid_loss"] == metrics["val_loss"]
    accuracy = metrics["val_accuracy"]
    assert metrics["valid_mean_token_accuracy"] == accuracy
    assert metrics["full_valid_mean_token_accuracy"] == accuracy and 0 <= accuracy <= 1


def test_a_requeued_chat_job_resumes_to_the_uninterrupted_adapter(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    settings: Settings,
    decoder: DecoderBase,
) -> None:
    chat = create_dataset(client, auth, chat_rows(20), kind="chat")
    body = {"training_file": chat, "method": {"type": "lora", "hyperparameters": HYPER}, "seed": 5}
    clean = create_job(client, auth, **body)
    assert run_next(db, settings, decoder) is RunOutcome.SUCCEEDED
    job = create_job(client, auth, **body)
    assert run_next(db, settings, decoder, shutdown_at_step(2)) is RunOutcome.REQUEUED
    assert client.get(f"{JOBS}/{job['id']}", headers=auth).json()["status"] == "queued"
    assert run_next(db, settings, decoder) is RunOutcome.SUCCEEDED

    clean = client.get(f"{JOBS}/{clean['id']}", headers=auth).json()
    job = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert job["progress"] == clean["progress"] == {"step": 5, "total_steps": 5, "epoch": 1.0}
    assert job["trained_tokens"] == clean["trained_tokens"] > 0
    with db() as session:
        rows = {
            r.name: r.weights
            for r in session.scalars(
                select(AdapterRow).where(AdapterRow.source_job_id.is_not(None))
            )
        }
    assert rows[job["adapter_name"]] == rows[clean["adapter_name"]]  # bit-exact resume


def test_a_requeued_decoder_reward_job_resumes_to_the_uninterrupted_adapter(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    settings: Settings,
    decoder: DecoderBase,
) -> None:
    rows = [{"prompt": f"Say {i}.", "chosen": f"{i}!", "rejected": "No."} for i in range(20)]
    pairs = create_dataset(client, auth, rows, kind="preference")
    body = {
        "training_file": pairs,
        "model": TINY_LLAMA_NAME,  # a preference file trains on the encoder by default
        "method": {"type": "lora", "hyperparameters": {**HYPER, "validation_fraction": 0}},
        "seed": 5,
    }
    clean = create_job(client, auth, **body)
    assert run_next(db, settings, decoder) is RunOutcome.SUCCEEDED
    job = create_job(client, auth, **body)
    assert run_next(db, settings, decoder, shutdown_at_step(2)) is RunOutcome.REQUEUED
    assert run_next(db, settings, decoder) is RunOutcome.SUCCEEDED

    clean = client.get(f"{JOBS}/{clean['id']}", headers=auth).json()
    job = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert job["progress"] == clean["progress"] == {"step": 5, "total_steps": 5, "epoch": 1.0}
    with db() as session:
        stored = {
            r.name: r
            for r in session.scalars(
                select(AdapterRow).where(AdapterRow.source_job_id.is_not(None))
            )
        }
        resumed, uninterrupted = stored[job["adapter_name"]], stored[clean["adapter_name"]]
        assert (resumed.task, resumed.base_fingerprint) == ("reward", decoder.fingerprint)
        assert resumed.config["head"]["pooling"] == "last_token"
        assert resumed.weights == uninterrupted.weights  # bit-exact resume


def test_dpo_trains_its_reference_adapters_method_config(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    settings: Settings,
    decoder: DecoderBase,
) -> None:
    """OpenAI's dpo type carries no lora block: with an SFT adapter of non-default LoRA
    settings as reference, the job was accepted and then failed in the worker."""
    chat = create_dataset(client, auth, chat_rows(8), kind="chat")
    lora = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    hyper = {**HYPER, "validation_fraction": 0}
    method = {"type": "lora", "lora": lora, "hyperparameters": hyper}
    create_job(client, auth, training_file=chat, adapter_name="sft-r4", method=method, seed=1)
    assert run_next(db, settings, decoder) is RunOutcome.SUCCEEDED
    dpo = create_dataset(client, auth, dpo_rows(8), kind="dpo")
    body: dict[str, Any] = {"training_file": dpo, "reference_adapter": "sft-r4", "seed": 1}

    # What the request sets must be the reference's: the policy starts from its weights.
    conflict = {"type": "lora", "lora": {"r": 8}, "hyperparameters": hyper}
    error = assert_error(
        client.post(JOBS, json={**body, "method": conflict}, headers=auth),
        422,
        param="method.lora.r",
        code="reference_adapter_method",
    )
    assert "'sft-r4' has 4" in error["message"]
    same = {"type": "lora", "lora": {"r": 4, "target_modules": ["v_proj", "q_proj"]}}
    create_job(client, auth, **body, method={**same, "hyperparameters": hyper})
    assert run_next(db, settings, decoder) is RunOutcome.SUCCEEDED

    # What it leaves out is the reference's.
    openai = {"type": "dpo", "dpo": {"hyperparameters": {**hyper, "beta": 0.1}}}
    job = create_job(client, auth, **body, method=openai)
    assert {k: job["method"]["lora"][k] for k in lora} == lora
    # Echoed as sent: OpenAI's type and block, the reference by name, on create, list and
    # retrieve (the learning rate sent is 10 times LoRA's default).
    sent = {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 10.0, "beta": 0.1}
    listed = client.get(JOBS, headers=auth).json()["data"][0]
    assert listed["id"] == job["id"]
    for echoed in (job, listed, client.get(f"{JOBS}/{job['id']}", headers=auth).json()):
        method = echoed["method"]
        assert method["type"] == "dpo" and method["dpo"] == {"hyperparameters": sent}
        assert method["reference_adapter"] == "sft-r4"
        assert method["reference_adapter_id"] == rows_by_name(db)["sft-r4"].id
        assert method["hyperparameters"] == {**hyper, "beta": 0.1}
    assert run_next(db, settings, decoder) is RunOutcome.SUCCEEDED
    job = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    # The values the run used; the multiplier as sent.
    assert job["method"]["dpo"]["hyperparameters"] == sent
    rows = rows_by_name(db)
    assert rows[job["adapter_name"]].config["method"] == rows["sft-r4"].config["method"]


def test_decoder_job_creation_refuses_what_the_worker_would_fail(
    client: TestClient, auth: Headers
) -> None:
    """Each of these was a 200, then a job failed in the worker (or one that trained an
    adapter nothing serves)."""
    chat = create_dataset(client, auth, chat_rows(4), kind="chat")
    dpo = create_dataset(client, auth, dpo_rows(4), kind="dpo")
    classification = create_dataset(client, auth)

    def refused(param: str, **body: Any) -> str:
        resp = client.post(JOBS, json=body, headers=auth)
        message: str = assert_error(resp, 422, param=param)["message"]
        return message

    # The tiny Llama's 2 layers and 256-token window, read from its config.json.
    for file in (chat, dpo):
        message = refused(
            "method.lora.layers",
            training_file=file,
            method={"type": "lora", "lora": {"layers": [2]}},
        )
        assert "2 layers (0 to 1)" in message
        refused(
            "method.hyperparameters.metric_for_best",
            training_file=file,
            method={"type": "lora", "hyperparameters": {"metric_for_best": "macro_f1"}},
        )
        message = refused(
            "method.hyperparameters.gradual_unfreezing",
            training_file=file,
            method={"type": "lora", "hyperparameters": {"gradual_unfreezing": True}},
        )
        assert "a task with a head" in message
        # Generation serves LoRA adapters only.
        for other in ("full", "prompt_tuning", "adapter"):
            message = refused("method.type", training_file=file, method={"type": other})
            assert "generation serves LoRA adapters only; use one of ['lora']" in message
    create_job(client, auth, training_file=chat, method={"type": "lora", "lora": {"layers": [1]}})
    # A decoder's classifiers and reward models are served whatever their decoder method.
    on_decoder: dict[str, Any] = {"training_file": classification, "model": TINY_LLAMA_NAME}
    for other in ("full", "prompt_tuning"):
        create_job(client, auth, **on_decoder, method={"type": other})
    message = refused("method.type", **on_decoder, method={"type": "adapter"})
    assert "use one of ['lora', 'full', 'prompt_tuning']" in message
    refused(
        "method.prompt_tuning.n_virtual_tokens",
        **on_decoder,
        method={"type": "prompt_tuning", "prompt_tuning": {"n_virtual_tokens": 256}},
    )


@pytest.mark.parametrize(
    ("method", "hyper", "param"),
    [
        ({"type": "lora", "lora": {"layers": [5]}}, {}, "method.lora.layers"),
        (
            {"type": "lora", "lora": {}},
            {"metric_for_best": "macro_f1"},
            "method.hyperparameters.metric_for_best",
        ),
    ],
)
def test_a_bad_setting_failing_in_the_worker_names_its_field(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    settings: Settings,
    decoder: DecoderBase,
    method: dict[str, Any],
    hyper: dict[str, Any],
    param: str,
) -> None:
    chat = create_dataset(client, auth, chat_rows(4), kind="chat")
    job = create_job(client, auth, training_file=chat, method={"type": "lora"})
    # As a job stored before creation checked these (or past a check that missed them).
    with db() as session:
        row = session.get(Job, job["id"])
        assert row is not None
        row.method = method
        row.hyperparameters = {**HYPER, "validation_fraction": 0, **hyper}
        session.commit()
    assert run_next(db, settings, decoder) is RunOutcome.FAILED
    error = client.get(f"{JOBS}/{job['id']}", headers=auth).json()["error"]
    assert error["param"] == param and error["message"].startswith(param.rsplit(".", 1)[1]), error
