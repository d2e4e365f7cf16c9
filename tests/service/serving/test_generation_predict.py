"""``/predict`` on a chat adapter (or a decoder base named as the adapter), on the tiny random
Llama behind the real serving hook: each input's reply is the one /v1/chat/completions gives
to the same user message, every input bounded, and adapters are the caller's own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from core.adapter import Adapter
from core.decoder.base import DecoderBase
from core.hardware import cpu_flags
from core.heads import Head, HeadConfig
from core.methods import parse_method_config
from core.methods.lora.config import LoraConfig
from core.methods.lora.model import LoraModel
from service.config import Settings
from service.main import create_app
from service.serving.lifespan import serving
from service.state import app_state
from tests.core.decoder.helpers import random_decoder_lora
from tests.core.decoder.tiny_llama import TINY_LLAMA_NAME
from tests.service.helpers import (
    ADMIN_KEY,
    Headers,
    assert_error,
    default_auth,
    json_post_scope,
    served_decoder,
    store_adapter,
    tiny_bases_settings,
    wait_until_idle,
)

pytestmark = pytest.mark.sqlite_only

MAX_TOKENS = 128  # LORAPLEX_PREDICT_MAX_TOKENS here
MAX_WAITING = 6
MAX_REQUEST_CHARS = 3000
INPUTS = ["Hello there.", "What is two and two?", "Bye!"]


@pytest.fixture
def app_settings(settings: Settings, tiny_model_dir: Path, tiny_llama_dir: Path) -> Settings:
    return tiny_bases_settings(
        settings,
        tiny_model_dir,
        tiny_llama_dir,
        TINY_LLAMA_NAME,
        max_request_chars=MAX_REQUEST_CHARS,
        predict_max_tokens=MAX_TOKENS,
        generation_max_waiting=MAX_WAITING,
        generation_kv_cache_mb=1,  # 8 sequences of the tiny model's 256 positions
    )


@pytest.fixture
def client(app_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings, hooks=[serving])) as test_client:
        yield test_client


def _chat_adapter(decoder: DecoderBase, task: str = "chat") -> Adapter:
    """A LoRA on q/v with B far from zero, so that its replies differ from the base's."""
    method = parse_method_config(
        "lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]}, "decoder"
    )
    gen = torch.Generator().manual_seed(0)
    return random_decoder_lora(decoder, method, HeadConfig(task=task), gen, scale=0.5)


def _reward_adapter(decoder: DecoderBase) -> Adapter:
    config = parse_method_config("lora", {"r": 2, "target_modules": ["q_proj"]}, "decoder")
    assert isinstance(config, LoraConfig)
    head_config = HeadConfig(task="reward", pooling="last_token", max_seq_length=128)
    head = Head(head_config, decoder.config.hidden_size)
    return Adapter.from_method(
        LoraModel(config, decoder), head_config, 1, {}, head_state=head.state_dict()
    )


def _chat(client: TestClient, auth: Headers, model: str, text: str, **extra: Any) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    resp = client.post("/v1/chat/completions", json=body, headers=auth)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_replies_equal_chat_completions_greedy_replies(
    client: TestClient, app_settings: Settings
) -> None:
    auth = default_auth(app_settings)
    decoder = served_decoder(client)
    store_adapter(client, auth, "chat", _chat_adapter(decoder), base=decoder)
    store_adapter(client, auth, "prefs", _chat_adapter(decoder, "dpo"), base=decoder)
    texts: dict[str, list[str]] = {}
    for name, task in (("chat", "chat"), ("prefs", "dpo"), (TINY_LLAMA_NAME, "chat")):
        resp = client.post(
            f"/predict?adapter={name}", json={"inputs": INPUTS, "max_tokens": 10}, headers=auth
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert (body["object"], body["adapter"], body["task"]) == ("prediction", name, task)
        predictions = body["predictions"]
        assert len(predictions) == len(INPUTS)
        texts[name] = [p["text"] for p in predictions]
        for text, prediction in zip(INPUTS, predictions, strict=True):
            assert set(prediction) == {"text", "finish_reason", "usage"}  # no labels
            chat = _chat(client, auth, name, text, max_tokens=10, temperature=0)
            choice = chat["choices"][0]
            assert prediction["text"] == choice["message"]["content"]
            assert prediction["finish_reason"] == choice["finish_reason"]
            counts = ("prompt_tokens", "completion_tokens", "total_tokens")
            assert [prediction["usage"][k] for k in counts] == [chat["usage"][k] for k in counts]
            # /predict's request of the same conversation left its prompt in the prefix
            # cache: all of it but the last token (whole blocks of 8) was not prefilled again.
            prompt_tokens = chat["usage"]["prompt_tokens"]
            cached = chat["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached == (prompt_tokens - 1) // 8 * 8
            assert prediction["usage"]["completion_tokens"] <= 10
    assert texts["chat"] != texts[TINY_LLAMA_NAME]  # the adapter is applied
    # Greedy by default, at most LORAPLEX_PREDICT_MAX_TOKENS; the same request, the same text.
    again = client.post("/predict?adapter=chat", json={"inputs": INPUTS[:1]}, headers=auth)
    assert again.status_code == 200, again.text
    (reply,) = again.json()["predictions"]
    chat = _chat(client, auth, "chat", INPUTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert reply["text"] == chat["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] <= MAX_TOKENS
    # Sampling: a seed makes it repeatable.
    seeded = {"inputs": INPUTS, "temperature": 1.0, "seed": 5, "max_tokens": 8}
    first = client.post("/predict?adapter=chat", json=seeded, headers=auth).json()
    assert client.post("/predict?adapter=chat", json=seeded, headers=auth).json() == first


def test_bounds_are_4xx_naming_the_field(client: TestClient, app_settings: Settings) -> None:
    auth = default_auth(app_settings)
    decoder = served_decoder(client)
    store_adapter(client, auth, "chat", _chat_adapter(decoder), base=decoder)

    def predict(**body: Any) -> Any:
        return client.post("/predict?adapter=chat", json=body, headers=auth)

    over = assert_error(predict(inputs=INPUTS, max_tokens=MAX_TOKENS + 1), 422, param="max_tokens")
    assert "LORAPLEX_PREDICT_MAX_TOKENS" in over["message"]
    assert_error(predict(inputs=INPUTS, max_tokens=0), 422, param="max_tokens")
    assert_error(predict(inputs=INPUTS, temperature=2.5), 422, param="temperature")
    assert_error(predict(inputs=["hi", ["a", "b"]]), 422, param="inputs.1")
    many = assert_error(predict(inputs=["hi"] * (MAX_WAITING + 1)), 422, param="inputs")
    assert "LORAPLEX_GENERATION_MAX_WAITING" in many["message"]
    half = "x" * (MAX_REQUEST_CHARS // 2 + 1)
    assert_error(predict(inputs=[half, half]), 413, param="inputs", code="request_too_large")
    # A prompt the context cannot hold (one byte a token; 256 positions) names its input.
    long = "y" * 400
    assert_error(
        predict(inputs=["hi", long]), 400, param="inputs.1", code="context_length_exceeded"
    )
    # mode on every generating route (the SDK's extra_body on the OpenAI ones).
    fused = client.post("/predict?adapter=chat&mode=fused", json={"inputs": ["hi"]}, headers=auth)
    assert_error(fused, 422, param="mode")
    for path, body in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ]:
        resp = client.post(path, json={"model": "chat", "mode": "fused", **body}, headers=auth)
        error = assert_error(resp, 422, param="mode")
        assert "merged" in error["message"]  # what it accepts
    # A reward model does not generate: the sampling fields are refused, not ignored.
    store_adapter(client, auth, "rm", _reward_adapter(decoder), base=decoder)
    for field, value in (("max_tokens", 4), ("temperature", 0.5), ("seed", 1)):
        body = {"inputs": ["hi"], field: value}
        resp = client.post("/predict?adapter=rm", json=body, headers=auth)
        assert_error(resp, 422, param=field)
    scored = client.post("/predict?adapter=rm", json={"inputs": ["hi"]}, headers=auth)
    assert scored.status_code == 200, scored.text
    assert set(scored.json()["predictions"][0]) == {"reward"}
    # Nothing of a refused request is left running.
    generation = app_state(client.app).generation
    assert generation is not None
    assert generation[TINY_LLAMA_NAME]._sinks == {}


def test_another_tenants_or_a_deleted_adapter_is_404(
    client: TestClient, app_settings: Settings
) -> None:
    auth = default_auth(app_settings)
    decoder = served_decoder(client)
    store_adapter(client, auth, "chat", _chat_adapter(decoder), base=decoder)
    made = client.post(
        "/v1/tenants", json={"name": "other"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert made.status_code == 200, made.text
    other = {"Authorization": f"Bearer {made.json()['api_key']['key']}"}
    body = {"inputs": ["hi"], "max_tokens": 2}
    resp = client.post("/predict?adapter=chat", json=body, headers=other)
    assert_error(resp, 404, param="adapter", code="adapter_not_found")
    # The base is everyone's.
    assert client.post(f"/predict?adapter={TINY_LLAMA_NAME}", json=body, headers=other).is_success
    assert client.post("/predict?adapter=chat", json=body, headers=auth).status_code == 200
    assert client.delete("/v1/models/chat", headers=auth).status_code == 200
    resp = client.post("/predict?adapter=chat", json=body, headers=auth)
    assert_error(resp, 404, param="adapter", code="adapter_not_found")


def test_a_client_that_leaves_frees_its_sequences(
    client: TestClient, app_settings: Settings
) -> None:
    """The client is gone as soon as its body is read: every input's sequence is cancelled
    and nothing is left waiting for events nobody reads."""
    server = app_state(client.app).generation
    assert server is not None
    gen_server = server[TINY_LLAMA_NAME]
    body = json.dumps({"inputs": INPUTS, "max_tokens": MAX_TOKENS}).encode()
    query = f"adapter={TINY_LLAMA_NAME}".encode()
    authorization = default_auth(app_settings)["Authorization"]
    scope = json_post_scope("/predict", body, authorization, query)
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])
    statuses: list[int] = []
    before = gen_server.scheduler.generated_tokens

    async def receive() -> dict[str, object]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(int(message["status"]))

    asyncio.run(client.app(scope, receive, send))  # type: ignore[arg-type]
    assert statuses == [499]
    assert gen_server._sinks == {}
    # Every sequence stops at the scheduler's next step, long before its MAX_TOKENS.
    wait_until_idle(gen_server.scheduler)
    assert gen_server.scheduler.running == 0
    assert gen_server.scheduler.generated_tokens - before < len(INPUTS) * MAX_TOKENS


def test_bfloat16_generation_keeps_the_fp32_base_and_sizes_its_cache(
    app_settings: Settings,
) -> None:
    bf16 = app_settings.model_copy(update={"generation_dtype": "bfloat16"})
    with TestClient(create_app(bf16, hooks=[serving])) as client:
        servers = app_state(client.app).generation
        assert servers is not None
        scheduler = servers[TINY_LLAMA_NAME].scheduler
        assert scheduler.weights.dtype == torch.bfloat16
        # Training and scoring keep the base's own fp32 weights beside the bf16 copy.
        assert served_decoder(client).weights.dtype == torch.float32
        # A bf16 cache holds twice float32's 8 sequences in the same MiB; without AMX the
        # cache stays float32 (core.hardware.kv_dtype), and so does the count.
        amx = "amx_bf16" in cpu_flags()
        assert scheduler.cache.dtype == (torch.bfloat16 if amx else torch.float32)
        assert scheduler.cache.slots == (16 if amx else 8)
        reply = _chat(client, default_auth(bf16), TINY_LLAMA_NAME, INPUTS[0], max_tokens=4)
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
        assert 1 <= reply["usage"]["completion_tokens"] <= 4
