"""A decoder's adapters through export and import: PEFT's own CAUSAL_LM LoRA folders import
(a chat adapter without a head, a last-token head with one), and an adapter PEFT has no layout
for exports in loraplex's format.

The app runs its real serving hook on the tiny encoder and the tiny random Llama, so an
imported chat adapter is used by /v1/chat/completions; PEFT folders are written by ``peft``.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as st_load
from sqlalchemy import select

from core.adapter import Adapter
from core.decoder.base import DecoderBase
from core.heads import Head, HeadConfig
from core.methods import parse_method_config
from service.adapters.store import adapter_from_row
from service.config import Settings
from service.db.models import AdapterRow
from service.state import app_state
from tests.core.decoder.tiny_llama import TINY_LLAMA_NAME
from tests.service.helpers import (
    Headers,
    assert_error,
    default_auth,
    store_adapter,
    zip_bytes,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IMPORT = "/v1/adapters/import"
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def peft_llama_files(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, bytes]:
    """A CAUSAL_LM LoRA saved by PEFT itself on the tiny Llama: no loraplex head, and
    ``base_model_name_or_path`` the local folder transformers loaded it from."""
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tiny_llama_dir))
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", init_lora_weights=False
    )
    out = tmp_path_factory.mktemp("peft-llama-lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(hf, config).save_pretrained(str(out))
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    recorded = json.loads(files["adapter_config.json"])["base_model_name_or_path"]
    assert Path(recorded).resolve() == tiny_llama_dir.resolve()
    return files


def _with_base_name(files: dict[str, bytes], name: str) -> dict[str, bytes]:
    config = json.loads(files["adapter_config.json"])
    return {
        **files,
        "adapter_config.json": json.dumps({**config, "base_model_name_or_path": name}).encode(),
    }


def _upload(client: TestClient, auth: Headers, data: bytes, **form: Any) -> httpx.Response:
    files = {"file": ("a.zip", data, "application/zip")}
    return client.post(IMPORT, headers=auth, data=form, files=files)


def _stored(client: TestClient, name: str) -> Adapter:
    with app_state(client.app).sessionmaker() as session:
        row = session.scalars(select(AdapterRow).where(AdapterRow.name == name)).one()
        return adapter_from_row(row)


def _decoder(client: TestClient) -> DecoderBase:
    decoder = app_state(client.app).require_bases().decoder
    assert decoder is not None
    return decoder


# --- PEFT's own CAUSAL_LM LoRA ------------------------------------------------------------------


@pytest.mark.parametrize("recorded", ["local folder", "hub id"])
def test_a_peft_causal_lm_lora_without_a_head_imports_as_a_chat_adapter(
    both: TestClient, settings: Settings, peft_llama_files: dict[str, bytes], recorded: str
) -> None:
    """It was refused: head_required without task, 'task must be classification or reward'
    with task=chat."""
    auth = default_auth(settings)
    files = peft_llama_files
    if recorded == "hub id":
        files = _with_base_name(files, TINY_LLAMA_NAME)
    resp = _upload(both, auth, zip_bytes(files), name="peft-chat", model=TINY_LLAMA_NAME)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["task"], body["method"]) == ("chat", "lora")
    assert body["base_model"] == TINY_LLAMA_NAME and body["label_names"] is None
    adapter = _stored(both, "peft-chat")
    assert adapter.method.to_dict()["target_modules"] == TARGETS
    assert adapter.head_state == {} and adapter.base_kind == "decoder"
    # PEFT's matrices, as PEFT wrote them.
    theirs = st_load(files["adapter_model.safetensors"])
    assert len(adapter.method_state) == len(theirs)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    assert torch.equal(
        adapter.method_state["model.layers.1.mlp.down_proj.lora_B.weight"], theirs[key]
    )

    chat = {"model": "peft-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    completion = both.post("/v1/chat/completions", json=chat, headers=auth)
    assert completion.status_code == 200, completion.text
    assert completion.json()["model"] == "peft-chat"

    # task=chat says the same.
    again = _upload(
        both, auth, zip_bytes(files), name="peft-chat-2", model=TINY_LLAMA_NAME, task="chat"
    )
    assert again.status_code == 200, again.text
    assert again.json()["task"] == "chat"


def test_a_reward_head_for_a_decoder_lora_is_a_decoder_s_head(
    both: TestClient, settings: Settings, peft_llama_files: dict[str, bytes]
) -> None:
    """task=reward built an encoder's head (pooling "base"), then refused its own adapter as
    'trained on encoder base model'."""
    auth = default_auth(settings)
    data = zip_bytes(peft_llama_files)
    resp = _upload(both, auth, data, name="peft-rm", model=TINY_LLAMA_NAME, task="reward")
    assert resp.status_code == 200, resp.text
    assert resp.json()["task"] == "reward" and resp.json()["base_model"] == TINY_LLAMA_NAME
    adapter = _stored(both, "peft-rm")
    assert adapter.head.pooling == "last_token" and adapter.base_kind == "decoder"
    scored = both.post("/predict?adapter=peft-rm", json={"inputs": ["a reply"]}, headers=auth)
    assert scored.status_code == 200, scored.text
    assert isinstance(scored.json()["predictions"][0]["reward"], float)

    labels = {"task": "classification", "label_names": "no,yes"}
    clf = _upload(both, auth, data, name="peft-clf", model=TINY_LLAMA_NAME, **labels)
    assert clf.status_code == 200, clf.text
    assert _stored(both, "peft-clf").head.pooling == "last_token"


def test_a_chat_task_is_refused_where_it_cannot_be(
    both: TestClient, settings: Settings, peft_llama_files: dict[str, bytes]
) -> None:
    auth = default_auth(settings)
    data = zip_bytes(peft_llama_files)
    # The encoder (the default base) has no language-model head.
    on_encoder = _upload(both, auth, data, name="x", task="chat")
    error = assert_error(on_encoder, 422, param="task", code="invalid_head")
    assert "decoder" in error["message"]
    # A chat adapter has no labels.
    labelled = _upload(
        both, auth, data, name="x", model=TINY_LLAMA_NAME, task="chat", label_names="a,b"
    )
    assert_error(labelled, 422, param="label_names", code="invalid_head")
    # Without model, a head-less PEFT adapter still needs a task, and is told about model.
    headless = _upload(both, auth, data, name="x")
    error = assert_error(headless, 422, param="task", code="head_required")
    assert "model" in error["message"]
    assert both.get("/v1/adapters/x", headers=auth).status_code == 404


def test_a_peft_lora_of_another_decoder_is_still_refused(
    both: TestClient, settings: Settings, peft_llama_files: dict[str, bytes], tmp_path: Path
) -> None:
    auth = default_auth(settings)
    for name in ("HuggingFaceTB/SmolLM2-360M-Instruct", str(tmp_path)):
        files = _with_base_name(peft_llama_files, name)
        resp = _upload(both, auth, zip_bytes(files), name="other", model=TINY_LLAMA_NAME)
        assert_error(resp, 422, param="file", code="base_model_mismatch")


# --- export -------------------------------------------------------------------------------------


def _decoder_prompt_tuning(decoder: DecoderBase) -> Adapter:
    """A decoder reward model trained with prompt tuning, as a finished job stores it."""
    method = parse_method_config("prompt_tuning", {"n_virtual_tokens": 4}, "decoder")
    head = HeadConfig(task="reward", pooling="last_token")
    gen = torch.Generator().manual_seed(0)
    return Adapter(
        method=method,
        head=head,
        method_state={"prompt_embeddings": torch.randn(4, decoder.hidden_size, generator=gen)},
        head_state=Head(head, decoder.hidden_size).state_dict(),
        base_name=decoder.name,
        base_fingerprint=decoder.fingerprint,
    )


def test_a_decoder_prompt_tuning_adapter_exports_as_loraplex_by_default(
    both: TestClient, settings: Settings
) -> None:
    """The default export was a 422 'has no PEFT equivalent; only lora and prompt_tuning
    export', naming `name`."""
    auth = default_auth(settings)
    decoder = _decoder(both)
    store_adapter(both, auth, "pt-rm", _decoder_prompt_tuning(decoder), base=decoder)
    export = both.get("/v1/adapters/pt-rm/export", headers=auth)
    assert export.status_code == 200, export.text
    assert "pt-rm-v1-loraplex.zip" in export.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(export.content)) as archive:
        assert sorted(archive.namelist()) == [
            "loraplex_adapter.json",
            "loraplex_adapter.safetensors",
        ]
    # ... and imports back as it was.
    again = _upload(both, auth, export.content, name="pt-rm-again", model=TINY_LLAMA_NAME)
    assert again.status_code == 200, again.text
    assert _stored(both, "pt-rm-again").head == _stored(both, "pt-rm").head

    peft_export = both.get("/v1/adapters/pt-rm/export?format=peft", headers=auth)
    error = assert_error(peft_export, 422, param="format", code="no_peft_format")
    assert "prompt tuning on a decoder base has no PEFT export" in error["message"]


@pytest.mark.parametrize("fmt", ["peft", "loraplex"])
def test_a_decoder_adapter_s_export_imports_back_without_model(
    both: TestClient, settings: Settings, peft_llama_files: dict[str, bytes], fmt: str
) -> None:
    """The archive names its base, and that base is loaded: without `model`, the import was
    checked against the encoder (the default) and refused as another base's."""
    auth = default_auth(settings)
    files = _with_base_name(peft_llama_files, TINY_LLAMA_NAME)
    stored = _upload(both, auth, zip_bytes(files), name="chat", model=TINY_LLAMA_NAME)
    assert stored.status_code == 200, stored.text
    export = both.get(f"/v1/adapters/chat/export?format={fmt}", headers=auth)
    assert export.status_code == 200, export.text
    again = _upload(both, auth, export.content, name="chat-again")
    assert again.status_code == 200, again.text
    assert again.json()["base_model"] == TINY_LLAMA_NAME
    assert (
        _stored(both, "chat-again").method_state.keys() == _stored(both, "chat").method_state.keys()
    )
    # An archive naming no loaded base still goes to the default, the encoder, which refuses
    # it, saying how to send it to the decoder.
    elsewhere = zip_bytes(_with_base_name(peft_llama_files, "someone/else"))
    error = assert_error(_upload(both, auth, elsewhere, name="x"), 422, code="head_required")
    assert "with model naming the decoder base" in error["message"]
