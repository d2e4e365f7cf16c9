"""A job's checkpoint served as a model under its ``fine_tuned_model_checkpoint`` name
(``<adapter>:ckpt-step-<N>``): /predict, /reward/compare, chat and text completions.

Jobs are created over HTTP, trained by a real ``JobRun`` on the bases the both serves, and their
checkpoints are compared with the adapter ``adapter_from_checkpoint`` builds from the stored
state, inserted as an ordinary adapter.
"""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select, update

from core.training.checkpoint import adapter_from_checkpoint
from service.config import Settings
from service.db.models import Checkpoint, Job, JobStatus
from service.state import app_state
from service.worker.job_run import RunOutcome
from tests.core.decoder.tiny_llama import TINY_LLAMA_NAME
from tests.core.training.conftest import sentiment_rows
from tests.service.helpers import (
    ADMIN_KEY,
    Headers,
    assert_error,
    claimed_run,
    create_dataset,
    default_auth,
    store_adapter,
)
from tests.tiny_bert import TINY_NAME

JOBS = "/v1/fine_tuning/jobs"
TEXTS = ["the movie was great", "a terrible , boring film that i hate", "fun"]


def train(client: TestClient, auth: Headers, **body: Any) -> list[dict[str, Any]]:
    """Create a job, run it to the end; its checkpoints, newest first."""
    resp = client.post(JOBS, json=body, headers=auth)
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["id"]
    state = app_state(client.app)
    base = state.require_bases()[resp.json()["model"]]
    run = claimed_run(state.sessionmaker, state.settings, base)  # type: ignore[arg-type]
    assert run.run() is RunOutcome.SUCCEEDED
    page = client.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()
    checkpoints: list[dict[str, Any]] = page["data"]
    return checkpoints


def store_checkpoint_adapter(
    client: TestClient, auth: Headers, checkpoint: dict[str, Any], name: str
) -> None:
    """The adapter the checkpoint's stored state makes, inserted as an adapter ``name``."""
    state = app_state(client.app)
    with state.sessionmaker() as session:
        data = session.scalar(select(Checkpoint.state).where(Checkpoint.id == checkpoint["id"]))
    assert data is not None
    job = client.get(f"{JOBS}/{checkpoint['fine_tuning_job_id']}", headers=auth).json()
    base = state.require_bases()[job["model"]]
    store_adapter(client, auth, name, adapter_from_checkpoint(data, base), base)


def predict(client: TestClient, auth: Headers, name: str) -> list[dict[str, float]]:
    resp = client.post(f"/predict?adapter={name}", json={"inputs": TEXTS}, headers=auth)
    assert resp.status_code == 200, resp.text
    return [p["probabilities"] for p in resp.json()["predictions"]]


def assert_close(a: list[dict[str, float]], b: list[dict[str, float]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(abs(x[k] - y[k]) <= 1e-6 for k in x)


def drop_state(client: TestClient, checkpoint_id: str) -> None:
    """What save_checkpoint does to a checkpoint past the newest ``keep_states``."""
    with app_state(client.app).sessionmaker() as session:
        session.execute(update(Checkpoint).where(Checkpoint.id == checkpoint_id).values(state=None))
        session.commit()


def other_tenant(client: TestClient) -> Headers:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    resp = client.post("/v1/tenants", json={"name": "other"}, headers=admin)
    assert resp.status_code == 200, resp.text
    return {"Authorization": f"Bearer {resp.json()['api_key']['key']}"}


def encoder_job(client: TestClient, auth: Headers, seed: int) -> list[dict[str, Any]]:
    # 40 rows, 4 held out, 36 in 3 batches of 16: a checkpoint at steps 3, 6 and 9, the
    # first without its state by the end (the newest 2 keep theirs).
    hyper = {"n_epochs": 4, "batch_size": 16, "learning_rate": 5e-2}
    return train(
        client,
        auth,
        training_file=create_dataset(client, auth, sentiment_rows(40)),
        model=TINY_NAME,
        adapter_name="ck",
        method={"type": "lora", "hyperparameters": hyper},
        seed=seed,
    )


def test_a_checkpoint_name_predicts_as_the_adapter_of_its_step(
    both: TestClient, settings: Settings
) -> None:
    auth = default_auth(settings)
    checkpoints = encoder_job(both, auth, seed=3)
    names = [c["fine_tuned_model_checkpoint"] for c in checkpoints]
    assert names == ["ck:ckpt-step-9", "ck:ckpt-step-6", "ck:ckpt-step-3"]
    newest = checkpoints[0]
    store_checkpoint_adapter(both, auth, newest, "expected")
    served = predict(both, auth, newest["fine_tuned_model_checkpoint"])
    assert_close(served, predict(both, auth, "expected"))
    # Not the finished adapter's numbers (trained 3 steps more), nor the adapter's key.
    final = predict(both, auth, "ck")
    assert any(abs(a["pos"] - b["pos"]) > 1e-4 for a, b in zip(served, final, strict=True))
    assert_close(predict(both, auth, newest["fine_tuned_model_checkpoint"]), served)

    # As unknown as a name nobody has: another tenant's, a checkpoint without its state, and
    # names that are not a checkpoint's.
    unknown = both.post("/predict?adapter=nope", json={"inputs": TEXTS}, headers=auth)
    shape = assert_error(unknown, 404, param="adapter")
    other = other_tenant(both)
    for name, headers in [
        ("ck:ckpt-step-9", other),
        ("ck:ckpt-step-3", auth),  # pruned by the job itself
        ("ck:ckpt-step-4", auth),  # no checkpoint at that step
        ("nope:ckpt-step-9", auth),
        ("ck:ckpt-step-", auth),
        ("ck:ckpt-step-1e3", auth),
        ("ck:ckpt-step-09", auth),
        ("ck:ckpt-step--9", auth),
        ("ck:ckpt-step-99999999999", auth),
        ("ck:ckpt-step-9:ckpt-step-9", auth),
        ("ck:ckpt-9", auth),
        (":ckpt-step-9", auth),
    ]:
        resp = both.post(f"/predict?adapter={name}", json={"inputs": TEXTS}, headers=headers)
        error = assert_error(resp, 404, param="adapter", code=shape["code"], type=shape["type"])
        assert error["message"] == shape["message"].replace("nope", name), name
    # A step of 10,000 digits is past the name's length bound, as any over-long name is.
    resp = both.post(
        f"/predict?adapter=ck:ckpt-step-{'9' * 10_000}", json={"inputs": TEXTS}, headers=auth
    )
    assert_error(resp, 422, param="adapter")

    # Its state dropped: a 404 from the next request on, whatever this process holds.
    drop_state(both, newest["id"])
    resp = both.post("/predict?adapter=ck:ckpt-step-9", json={"inputs": TEXTS}, headers=auth)
    assert_error(resp, 404, param="adapter")

    # The name retrained by a later job names that job's checkpoints, never the first's.
    middle = predict(both, auth, "ck:ckpt-step-6")
    assert both.delete("/v1/adapters/ck", headers=auth).status_code == 200
    # Deleting the adapter withdraws its checkpoints too: their states are gone.
    resp = both.post("/predict?adapter=ck:ckpt-step-6", json={"inputs": TEXTS}, headers=auth)
    assert_error(resp, 404, param="adapter")
    with app_state(both.app).sessionmaker() as session:
        states = session.scalars(select(Checkpoint.id).where(Checkpoint.state.is_not(None))).all()
    assert states == []
    retrained = encoder_job(both, auth, seed=4)
    store_checkpoint_adapter(both, auth, retrained[1], "expected-2")
    again = predict(both, auth, "ck:ckpt-step-6")
    assert_close(again, predict(both, auth, "expected-2"))
    assert any(abs(a["pos"] - b["pos"]) > 1e-4 for a, b in zip(again, middle, strict=True))


def test_a_checkpoint_name_is_a_model_while_it_serves(both: TestClient, settings: Settings) -> None:
    auth = default_auth(settings)
    newest, _, pruned = encoder_job(both, auth, seed=3)
    name = newest["fine_tuned_model_checkpoint"]
    resp = both.get(f"/v1/models/{name}", headers=auth)
    assert resp.status_code == 200, resp.text
    model, adapter = resp.json(), both.get("/v1/models/ck", headers=auth).json()
    assert model == {
        "id": name,
        "object": "model",
        "created": newest["created_at"],
        "owned_by": adapter["owned_by"],
        "kind": "checkpoint",
        "base_kind": "encoder",
        "root": TINY_NAME,
        "parent": TINY_NAME,
        "checkpoint_id": newest["id"],
        "method": "lora",
        "task": "classification",
        "label_names": adapter["label_names"],
    }
    # Retrieved by name, not listed (the job's checkpoints list them).
    listed = [m["id"] for m in both.get("/v1/models", headers=auth).json()["data"]]
    assert "ck" in listed and name not in listed
    # Another tenant's, and one the job pruned, are unknown models.
    for model_id, headers in [
        (name, other_tenant(both)),
        (pruned["fine_tuned_model_checkpoint"], auth),
    ]:
        assert_error(both.get(f"/v1/models/{model_id}", headers=headers), 404)
        assert_error(both.delete(f"/v1/models/{model_id}", headers=headers), 404)
    # DELETE withdraws it (its state dropped) once its job has finished, not while the job may
    # resume from it.
    middle = checkpoints_of(both, auth, newest["fine_tuning_job_id"])[1]
    set_job_status(both, newest["fine_tuning_job_id"], JobStatus.RUNNING)
    refused = both.delete(f"/v1/models/{name}", headers=auth)
    assert_error(refused, 409, param="model", code="checkpoint_in_use")
    assert both.get(f"/v1/models/{name}", headers=auth).status_code == 200
    set_job_status(both, newest["fine_tuning_job_id"], JobStatus.CANCELLED)
    assert predict(both, auth, name)  # served, so cached
    deleted = both.delete(f"/v1/models/{name}", headers=auth)
    assert deleted.status_code == 200 and deleted.json()["id"] == name, deleted.text
    assert_error(both.get(f"/v1/models/{name}", headers=auth), 404)
    resp = both.post(f"/predict?adapter={name}", json={"inputs": TEXTS}, headers=auth)
    assert_error(resp, 404, param="adapter")
    # The job's other checkpoint, and the adapter, still serve; the adapter takes the rest.
    other = middle["fine_tuned_model_checkpoint"]
    assert both.get(f"/v1/models/{other}", headers=auth).status_code == 200
    assert both.delete("/v1/models/ck", headers=auth).status_code == 200
    assert_error(both.get(f"/v1/models/{other}", headers=auth), 404)


def checkpoints_of(client: TestClient, auth: Headers, job_id: str) -> list[dict[str, Any]]:
    page = client.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()
    return page["data"]  # type: ignore[no-any-return]


def set_job_status(client: TestClient, job_id: str, status: JobStatus) -> None:
    with app_state(client.app).sessionmaker() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=status))
        session.commit()


def test_decoder_checkpoints_generate_and_score(both: TestClient, settings: Settings) -> None:
    auth = default_auth(settings)
    hyper = {"n_epochs": 2, "batch_size": 4, "max_seq_length": 64, "learning_rate": 5e-2}
    chat_rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        }
        for i in range(8)
    ]
    (chat,) = train(
        both,
        auth,
        training_file=create_dataset(both, auth, chat_rows, kind="chat"),
        adapter_name="chat",
        method={"type": "lora", "hyperparameters": {**hyper, "validation_fraction": 0}},
        seed=1,
    )
    assert chat["fine_tuned_model_checkpoint"] == "chat:ckpt-step-2"
    model = both.get("/v1/models/chat:ckpt-step-2", headers=auth).json()
    # A chat model has no labels: left out, as the adapter's object leaves them out.
    assert (model["kind"], model["task"], model["base_kind"]) == ("checkpoint", "chat", "decoder")
    assert "label_names" not in model
    store_checkpoint_adapter(both, auth, chat, "chat-expected")
    ask = {
        "messages": [{"role": "user", "content": "What is 3 plus 3?"}],
        "max_tokens": 8,
        "temperature": 0,
    }

    def reply(model: str, headers: Headers = auth) -> Any:
        return both.post("/v1/chat/completions", json={**ask, "model": model}, headers=headers)

    resp = reply("chat:ckpt-step-2")
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == "chat:ckpt-step-2"
    text = resp.json()["choices"][0]["message"]["content"]
    assert text == reply("chat-expected").json()["choices"][0]["message"]["content"]
    prompt = {"prompt": "What is", "max_tokens": 6, "temperature": 0}
    completions = [
        both.post("/v1/completions", json={**prompt, "model": m}, headers=auth)
        for m in ("chat:ckpt-step-2", "chat-expected")
    ]
    assert [c.status_code for c in completions] == [200, 200]
    texts = [c.json()["choices"][0]["text"] for c in completions]
    assert texts[0] == texts[1]
    assert_error(reply("chat:ckpt-step-2", other_tenant(both)), 404, param="model")
    assert_error(reply("chat:ckpt-step-1"), 404, param="model")

    # A decoder reward model's checkpoint on /reward/compare.
    rows = [{"prompt": f"Say {i}.", "chosen": f"{i}!", "rejected": "No."} for i in range(8)]
    (rm,) = train(
        both,
        auth,
        training_file=create_dataset(both, auth, rows, kind="preference"),
        model=TINY_LLAMA_NAME,
        adapter_name="rm",
        method={"type": "lora", "hyperparameters": {**hyper, "validation_fraction": 0}},
        seed=1,
    )
    store_checkpoint_adapter(both, auth, rm, "rm-expected")
    pairs = {"pairs": [{"prompt": "Say 3.", "response_a": "3!", "response_b": "No."}]}
    scored = [
        both.post(f"/reward/compare?adapter={name}", json=pairs, headers=auth)
        for name in (rm["fine_tuned_model_checkpoint"], "rm-expected")
    ]
    assert [s.status_code for s in scored] == [200, 200], scored[0].text
    a, b = (s.json()["results"][0] for s in scored)
    assert abs(a["reward_a"] - b["reward_a"]) <= 1e-6 and abs(a["reward_b"] - b["reward_b"]) <= 1e-6
