"""Several bases in one process (service.bases): the settings that list them, the serving hook
that loads them, /v1/models, a job's ``model``, and an adapter meeting another base.

On the tiny random BERT and tiny random Llama (fast); the real MiniLM and SmolLM2 side by side
are in tests/e2e/test_bases.py.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from core.adapter import Adapter
from core.base import FrozenBase
from core.decoder.base import DEFAULT_DECODER_NAME, DecoderBase
from core.heads import HeadConfig
from core.methods import parse_method_config
from service.bases import Bases, base_specs, resolve_job_base
from service.cli import EXIT_STARTUP_ERROR, main
from service.config import DEFAULT_BASE_MODEL_NAME, Settings
from service.db.models import Job
from service.errors import ErrorKind, ServiceError
from service.jobs import queue
from service.main import create_app
from service.serving.lifespan import serving
from service.state import app_state
from service.worker.embedded import settings_env
from tests.core.decoder.helpers import random_decoder_lora
from tests.core.decoder.tiny_llama import TINY_LLAMA_NAME
from tests.core.inference.helpers import lora
from tests.e2e.server import free_port
from tests.service.conftest import make_settings
from tests.service.helpers import (
    add_queued_job,
    assert_error,
    create_dataset,
    default_auth,
    job_body,
    store_adapter,
    tenant_id_by_name,
    tiny_bases_settings,
)
from tests.tiny_bert import TINY_NAME

JOBS = "/v1/fine_tuning/jobs"
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in [("hi", "hello"), ("2+2?", "4"), ("sky?", "blue"), ("bye", "goodbye")]
]


def _chat_adapter(decoder: DecoderBase) -> Adapter:
    """A decoder's LoRA adapter for chat (non-zero B, so it changes the logits)."""
    method = parse_method_config("lora", {"r": 2, "target_modules": ["q_proj"]}, "decoder")
    gen = torch.Generator().manual_seed(0)
    return random_decoder_lora(decoder, method, HeadConfig(task="chat"), gen, scale=0.1)


# --- settings ----------------------------------------------------------------------------------


def test_by_default_both_bases_are_configured_under_their_names(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.bases == [DEFAULT_BASE_MODEL_NAME, DEFAULT_DECODER_NAME]
    specs = base_specs(settings)
    assert [(s.name, s.kind, s.path) for s in specs.values()] == [
        (DEFAULT_BASE_MODEL_NAME, "encoder", None),
        (DEFAULT_DECODER_NAME, "decoder", None),
    ]
    # Renaming a base without listing the bases keeps both, under the new name.
    renamed = Settings(_env_file=None, data_dir=tmp_path, decoder_model_name="mine")  # type: ignore[call-arg]
    assert renamed.bases == [DEFAULT_BASE_MODEL_NAME, "mine"]


def test_bases_are_read_comma_separated_and_reach_the_worker_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAPLEX_BASES", f" {DEFAULT_DECODER_NAME} , {DEFAULT_BASE_MODEL_NAME}")
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.bases == [DEFAULT_DECODER_NAME, DEFAULT_BASE_MODEL_NAME]
    assert [s.kind for s in base_specs(settings).values()] == ["decoder", "encoder"]
    # The embedded worker gets the settings as variables: the same list comes back.
    child_env = settings_env(settings)
    monkeypatch.setenv("LORAPLEX_BASES", child_env["LORAPLEX_BASES"])
    assert Settings(_env_file=None, data_dir=tmp_path).bases == settings.bases  # type: ignore[call-arg]


def test_a_missing_decoder_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such.gguf"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LORAPLEX_PORT", str(free_port()))
    monkeypatch.setenv("LORAPLEX_DECODER_MODEL_PATH", str(missing))
    assert main(["serve"]) == EXIT_STARTUP_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"loraplex: LORAPLEX_DECODER_MODEL_PATH={missing}: ")
    assert "neither a .gguf file nor a folder" in err and "LORAPLEX_BASES" in err
    assert not (tmp_path / "data").exists()
    # An encoder-only deployment does not look for the decoder at all.
    monkeypatch.setenv("LORAPLEX_BASES", DEFAULT_BASE_MODEL_NAME)
    monkeypatch.setenv("LORAPLEX_BASE_MODEL_PATH", str(tmp_path / "no-encoder"))
    assert main(["serve"]) == EXIT_STARTUP_ERROR
    assert "LORAPLEX_BASE_MODEL_PATH=" in capsys.readouterr().err


def test_the_decoder_name_is_core_s(tmp_path: Path) -> None:
    # service.config spells it out so that reading settings does not import torch.
    assert make_settings(tmp_path).decoder_model_name == DEFAULT_DECODER_NAME


def test_a_job_s_base_is_its_model_or_by_default_the_encoder(tmp_path: Path) -> None:
    both = make_settings(tmp_path, bases=[DEFAULT_DECODER_NAME, DEFAULT_BASE_MODEL_NAME])
    assert resolve_job_base(both, None).name == DEFAULT_BASE_MODEL_NAME
    assert resolve_job_base(both, None, default_kind="decoder").name == DEFAULT_DECODER_NAME
    assert resolve_job_base(both, DEFAULT_DECODER_NAME).kind == "decoder"
    decoder_only = make_settings(tmp_path, bases=[DEFAULT_DECODER_NAME])
    assert resolve_job_base(decoder_only, None).name == DEFAULT_DECODER_NAME
    with pytest.raises(ServiceError) as refused:
        resolve_job_base(decoder_only, DEFAULT_BASE_MODEL_NAME)
    assert refused.value.kind == ErrorKind.NOT_FOUND and refused.value.param == "model"


# --- the serving hook with both bases ---------------------------------------------------------
# (sqlite_only: which base serves what does not depend on the database.)


@pytest.mark.sqlite_only
def test_both_bases_load_once_and_are_listed_with_their_kind(
    both: TestClient, settings: Settings
) -> None:
    state = app_state(both.app)
    bases = state.require_bases()
    assert isinstance(bases, Bases) and list(bases) == [TINY_NAME, TINY_LLAMA_NAME]
    assert isinstance(bases.encoder, FrozenBase) and isinstance(bases.decoder, DecoderBase)
    assert state.require_base_model() is bases.encoder  # the encoder routes' base, as before
    assert state.require_base(TINY_LLAMA_NAME) is bases.decoder
    assert_error(both.get("/v1/models/gpt-17", headers=default_auth(settings)), 404)

    models = both.get("/v1/models", headers=default_auth(settings)).json()["data"]
    assert [(m["id"], m["kind"], m["base_kind"]) for m in models] == [
        (TINY_NAME, "base", "encoder"),
        (TINY_LLAMA_NAME, "base", "decoder"),
    ]
    decoder = models[1]
    assert decoder["max_model_len"] == 256 and decoder["num_layers"] == 2
    assert decoder["hidden_size"] == 64 and decoder["num_params"] == bases.decoder.num_params
    assert decoder["fingerprint"] == bases.decoder.fingerprint and decoder["created"] > 0
    assert (
        both.get(f"/v1/models/{TINY_LLAMA_NAME}", headers=default_auth(settings)).json() == decoder
    )


def test_a_job_s_model_picks_its_base(
    both: TestClient, settings: Settings, tiny_model_dir: Path, tiny_llama_dir: Path
) -> None:
    auth = default_auth(settings)
    train = create_dataset(both, auth)
    chats = create_dataset(both, auth, CHAT_ROWS, kind="chat")
    on_decoder = both.post(JOBS, json=job_body(chats, model=TINY_LLAMA_NAME), headers=auth)
    assert on_decoder.status_code == 200, on_decoder.text
    assert on_decoder.json()["model"] == TINY_LLAMA_NAME
    by_default = both.post(JOBS, json=job_body(train), headers=auth).json()
    assert by_default["model"] == TINY_NAME
    assert_error(
        both.post(JOBS, json=job_body(train, model="gpt-17"), headers=auth),
        404,
        param="model",
        code="model_not_found",
    )
    # Each base's own layer count is checked at creation: the encoder's 2, not the decoder's.
    lora_on_layer_5 = {"type": "lora", "lora": {"r": 8, "layers": [5]}}
    refused = both.post(JOBS, json=job_body(train, method=lora_on_layer_5), headers=auth)
    assert_error(refused, 422)
    stored = app_state(both.app).sessionmaker().get(Job, on_decoder.json()["id"])
    assert stored is not None and stored.model == TINY_LLAMA_NAME


@pytest.mark.sqlite_only
def test_an_adapter_runs_only_on_its_own_base(both: TestClient, settings: Settings) -> None:
    auth = default_auth(settings)
    state = app_state(both.app)
    encoder, decoder = state.require_base_model(), state.require_bases().decoder
    assert decoder is not None
    store_adapter(both, auth, "clf", lora(encoder, r=2))
    store_adapter(both, auth, "chat", _chat_adapter(decoder), base=decoder)
    body = {"inputs": ["a fine day"]}
    assert both.post("/predict?adapter=clf", json=body, headers=auth).status_code == 200

    # The decoder serves its classifiers and reward models here; a chat adapter generates.
    resp = both.post("/predict?adapter=chat", json={**body, "max_tokens": 2}, headers=auth)
    assert resp.status_code == 200, resp.text
    assert resp.json()["task"] == "chat" and "text" in resp.json()["predictions"][0]

    # The chat adapter lists its base; its PEFT export is laid out for it (the decoder's).
    chat = both.get("/v1/models/chat", headers=auth).json()
    assert chat["parent"] == chat["root"] == TINY_LLAMA_NAME and chat["base_kind"] == "decoder"
    export = both.get("/v1/adapters/chat/export?format=peft", headers=auth)
    assert export.status_code == 200, export.text
    with zipfile.ZipFile(io.BytesIO(export.content)) as archive:
        config = json.loads(archive.read("adapter_config.json"))
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == TINY_LLAMA_NAME
    # An export imports onto the base it names (this one is loaded) ...
    exported = both.get("/v1/adapters/chat/export?format=loraplex", headers=auth).content
    files = {"file": ("chat.zip", exported, "application/zip")}
    imported = both.post("/v1/adapters/import", data={"name": "again"}, files=files, headers=auth)
    assert imported.status_code == 200, imported.text
    assert imported.json()["base_model"] == TINY_LLAMA_NAME
    # ... and ``model`` naming another base is refused, naming both.
    form = {"name": "again1", "model": TINY_NAME}
    imported = both.post("/v1/adapters/import", data=form, files=files, headers=auth)
    assert_error(imported, 422, code="base_model_mismatch")
    assert TINY_LLAMA_NAME in imported.json()["error"]["message"]
    form = {"name": "again2", "model": "gpt-17"}
    unknown = both.post("/v1/adapters/import", data=form, files=files, headers=auth)
    assert_error(unknown, 404, param="model")


@pytest.mark.sqlite_only
def test_an_adapter_of_a_base_not_loaded_is_refused(
    settings: Settings, tiny_model_dir: Path, tiny_llama_dir: Path, tiny_base: FrozenBase
) -> None:
    # The decoder's adapter, stored while the decoder was loaded; the deployment then loads
    # only the encoder.
    both = tiny_bases_settings(settings, tiny_model_dir, tiny_llama_dir, TINY_NAME, TINY_LLAMA_NAME)
    with TestClient(create_app(both, hooks=[serving])) as client:
        decoder = app_state(client.app).require_bases().decoder
        assert decoder is not None
        store_adapter(client, default_auth(both), "chat", _chat_adapter(decoder), base=decoder)
    encoder_only = both.model_copy(update={"bases": [TINY_NAME]})
    with TestClient(create_app(encoder_only, hooks=[serving])) as client:
        auth = default_auth(encoder_only)
        export = client.get("/v1/adapters/chat/export?format=peft", headers=auth)
        assert_error(export, 422, param="name", code="base_model_mismatch")
        assert "does not load" in export.json()["error"]["message"]
        loraplex = client.get("/v1/adapters/chat/export?format=loraplex", headers=auth)
        assert loraplex.status_code == 200  # its own format needs no base
        predict = client.post("/predict?adapter=chat", json={"inputs": ["hi"]}, headers=auth)
        assert_error(predict, 422, code="base_model_mismatch")
        chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        completion = client.post("/v1/chat/completions", json=chat, headers=auth)
        assert_error(completion, 422, param="model", code="base_model_mismatch")
        models = client.get("/v1/models", headers=auth).json()["data"]
        assert [m["id"] for m in models] == [TINY_NAME, "chat"]
        assert "base_kind" not in models[1]  # its base is not one this deployment knows


def test_a_decoder_adapter_of_another_fingerprint_is_refused_as_predict_refuses_it(
    both: TestClient, settings: Settings
) -> None:
    # Trained on a base of the loaded decoder's name but other weights: generation answers
    # as /predict does (invariant 8), not that the adapter cannot generate.
    decoder = app_state(both.app).require_bases().decoder
    assert decoder is not None
    adapter = _chat_adapter(decoder)
    adapter.base_fingerprint = "sha256:" + "0" * 64
    auth = default_auth(settings)
    store_adapter(both, auth, "other-weights", adapter, base=decoder)
    predict = both.post("/predict?adapter=other-weights", json={"inputs": ["hi"]}, headers=auth)
    assert_error(predict, 422, param="adapter", code="base_model_mismatch")
    for path, body in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ]:
        resp = both.post(path, json={"model": "other-weights", **body}, headers=auth)
        error = assert_error(resp, 422, param="model", code="base_model_mismatch")
        assert TINY_LLAMA_NAME in error["message"]


# --- one base -----------------------------------------------------------------------------------


@pytest.mark.sqlite_only
def test_a_decoder_only_deployment_starts_and_says_it_has_no_encoder(
    settings: Settings, tiny_model_dir: Path, tiny_llama_dir: Path
) -> None:
    decoder_only = tiny_bases_settings(settings, tiny_model_dir, tiny_llama_dir, TINY_LLAMA_NAME)
    with TestClient(create_app(decoder_only, hooks=[serving])) as client:
        auth = default_auth(decoder_only)
        assert client.get("/readyz").status_code == 200
        state = app_state(client.app)
        assert state.base_model is None and state.require_bases().encoder is None
        decoder = state.require_bases().decoder
        assert decoder is not None
        store_adapter(client, auth, "chat", _chat_adapter(decoder), base=decoder)
        for path, body in [
            ("/predict?adapter=chat", {"inputs": ["hi"], "max_tokens": 2}),
            ("/reward/compare?adapter=chat", {"chosen": "a", "rejected": "b"}),
        ]:
            resp = client.post(path, json=body, headers=auth)
            if path.startswith("/reward"):  # a chat adapter is no reward model, first of all
                assert_error(resp, 422)
                continue
            # The decoder is served here too: a chat adapter generates a reply.
            assert resp.status_code == 200, resp.text
            assert resp.json()["predictions"][0]["finish_reason"] in ("stop", "length")
        models = client.get("/v1/models", headers=auth).json()["data"]
        assert [(m["id"], m.get("base_kind")) for m in models] == [
            (TINY_LLAMA_NAME, "decoder"),
            ("chat", "decoder"),
        ]
        chats = create_dataset(client, auth, CHAT_ROWS, kind="chat")
        job = client.post(JOBS, json=job_body(chats), headers=auth).json()
        assert job["model"] == TINY_LLAMA_NAME  # the one base there is
        assert_error(
            client.post(JOBS, json=job_body(chats, model=TINY_NAME), headers=auth),
            404,
            param="model",
        )


# --- the worker's queue ---------------------------------------------------------------------


def test_a_worker_claims_only_jobs_on_the_bases_it_loaded(
    client: TestClient, db: sessionmaker[Session]
) -> None:
    tenant_id = tenant_id_by_name(db)
    on_decoder = add_queued_job(db, tenant_id, "chat", model=TINY_LLAMA_NAME)
    on_encoder = add_queued_job(db, tenant_id, "clf", model=TINY_NAME)
    claims: list[Any] = []
    with db() as session:
        for _ in range(2):
            job = queue.claim_next_job(session, "enc", 30, models=[TINY_NAME])
            claims.append(job.id if job is not None else None)
        job = queue.claim_next_job(session, "dec", 30, models=[TINY_LLAMA_NAME])
        claims.append(job.id if job is not None else None)
    # The older decoder job waits for a worker with the decoder; the encoder's goes first.
    assert claims == [on_encoder, None, on_decoder]
