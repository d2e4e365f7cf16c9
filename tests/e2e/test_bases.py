"""The real MiniLM and SmolLM2 side by side in one ``loraplex serve``, seen through the OpenAI
SDK over real HTTP: both listed as models with their kind, and a job's ``model`` picking one.

No worker runs here: the jobs stay queued (training on the decoder is tested elsewhere).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from service.config import DEFAULT_BASE_MODEL_NAME, DEFAULT_DECODER_NAME
from tests.e2e.server import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in [("Hi!", "Hello."), ("2+2?", "4."), ("Sky colour?", "Blue."), ("Bye.", "Bye!")]
]
LORA = {"type": "lora", "lora": {"r": 4}, "hyperparameters": {"n_epochs": 1}}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    server = ServerProcess(
        tmp_path_factory.mktemp("loraplex-bases"),
        settings={
            "bases": f"{DEFAULT_BASE_MODEL_NAME},{DEFAULT_DECODER_NAME}",
            "embedded_worker": "false",
            # One sequence's worth of KV cache: generation is not what this module tests.
            "generation_kv_cache_mb": 64,
        },
    )
    server.start()
    try:
        with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key) as c:
            yield c
    finally:
        server.stop()


def test_both_bases_are_listed_with_their_kind_and_size(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [DEFAULT_BASE_MODEL_NAME, DEFAULT_DECODER_NAME]
    encoder, decoder = (m.model_extra or {} for m in models)
    assert all(m.owned_by == "system" for m in models)
    assert (encoder["kind"], encoder["base_kind"]) == ("base", "encoder")
    assert encoder["max_model_len"] == 256 and encoder["num_params"] == 22_565_376
    assert (decoder["kind"], decoder["base_kind"]) == ("base", "decoder")
    # SmolLM2-135M: 134.5 M parameters (tied embeddings counted once), 30 layers; of its 8192
    # positions, generation holds LORAPLEX_GENERATION_CONTEXT_TOKENS' default, 1024, and
    # refuses longer prompts, so that is the length a client may send.
    assert decoder["num_params"] == 134_515_008 and decoder["max_model_len"] == 1024
    assert decoder["num_layers"] == 30 and decoder["hidden_size"] == 576
    assert len(decoder["fingerprint"]) == 64 and decoder["fingerprint"] != encoder["fingerprint"]
    # A slash in the id, percent-encoded by the SDK.
    retrieved = client.models.retrieve(DEFAULT_DECODER_NAME)
    assert retrieved.id == DEFAULT_DECODER_NAME and retrieved.model_extra == decoder


def test_a_job_s_model_picks_its_base(client: openai.OpenAI) -> None:
    data = "".join(json.dumps(row) + "\n" for row in CHAT_ROWS).encode()
    file = client.files.create(file=("chat.jsonl", data), purpose="fine-tune")
    assert file.model_extra and file.model_extra["kind"] == "chat"
    job = client.fine_tuning.jobs.create(
        model=DEFAULT_DECODER_NAME,
        training_file=file.id,
        method=LORA,  # type: ignore[arg-type]  # loraplex's own method type
    )
    assert job.model == DEFAULT_DECODER_NAME and job.status == "queued"
    assert client.fine_tuning.jobs.retrieve(job.id).model == DEFAULT_DECODER_NAME
    with pytest.raises(openai.NotFoundError) as refused:
        client.fine_tuning.jobs.create(
            model="gpt-4o-mini",
            training_file=file.id,
            method=LORA,  # type: ignore[arg-type]
        )
    assert refused.value.code == "model_not_found"
