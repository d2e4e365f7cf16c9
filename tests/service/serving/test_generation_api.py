"""/v1/chat/completions and /v1/completions on a real uvicorn server with SmolLM2, through the
official ``openai`` SDK: greedy text equals core's greedy loop, streaming equals the
non-streamed text, adapters are the caller's own, errors are OpenAI's."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import ClientDisconnect

from core.adapter import Adapter
from core.decoder.base import DEFAULT_DECODER_NAME, DecoderBase
from core.decoder.generate import greedy_generate
from core.generation.kv import bytes_per_slot
from core.heads import HeadConfig
from core.methods import parse_method_config
from core.methods.lora.config import LoraConfig
from core.methods.lora.model import LoraModel
from service.cli import uvicorn_config
from service.main import create_app
from service.serving.lifespan import serving
from service.state import app_state
from tests.e2e.server import free_port
from tests.service.conftest import make_settings
from tests.service.helpers import (
    ADMIN_KEY,
    assert_error,
    json_post_scope,
    wait_until,
    wait_until_idle,
)

pytestmark = pytest.mark.real_model

CONTEXT = 512
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]


@dataclass
class Server:
    url: str
    app: FastAPI
    key: str  # the default tenant's
    other_key: str  # a second tenant's

    def sdk(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.key, max_retries=0)

    @property
    def decoder(self) -> DecoderBase:
        bases = app_state(self.app).bases
        assert bases is not None and bases.decoder is not None
        return bases.decoder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("generation")
    settings = make_settings(
        data_dir,
        admin_key=ADMIN_KEY,
        host="127.0.0.1",
        port=free_port(),
        bases=[DEFAULT_DECODER_NAME],
        embedded_worker=False,
        generation_context_tokens=CONTEXT,
        generation_kv_cache_mb=96,  # 4 sequences of 512 tokens (22.5 MiB each)
    )
    app = create_app(settings, hooks=[serving])
    uv = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.1)
    url = f"http://127.0.0.1:{settings.port}"
    key = (Path(data_dir) / "default_api_key").read_text().strip()
    made = httpx.post(
        f"{url}/v1/tenants",
        json={"name": "other"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert made.status_code == 200, made.text
    try:
        yield Server(url, app, key, made.json()["api_key"]["key"])
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


def core_ids(
    base: DecoderBase, prompt: list[int], n: int, lora: LoraModel | None = None
) -> list[int]:
    """core's greedy loop: the reply's ids, its stop token left out."""
    if lora is None:
        (ids,) = greedy_generate(base.weights, [prompt], n, base.stop_token_ids)
    else:
        (ids,) = greedy_generate(base.weights, [prompt], n, base.stop_token_ids, hooks=lora.hooks())
    return ids


def core_greedy(base: DecoderBase, prompt: list[int], n: int, lora: LoraModel | None = None) -> str:
    return str(base.tokenizer.decode(core_ids(base, prompt, n, lora), skip_special_tokens=True))


def chat_prompt(base: DecoderBase) -> list[int]:
    return list(base.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True))


def test_chat_greedy_equals_core_and_stream_equals_whole(server: Server) -> None:
    sdk = server.sdk()
    reply = sdk.chat.completions.create(
        model=DEFAULT_DECODER_NAME,
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
    )
    prompt = chat_prompt(server.decoder)
    ids = core_ids(server.decoder, prompt, 8)
    expected = core_greedy(server.decoder, prompt, 8)
    assert reply.choices[0].message.content == expected
    assert "Paris" in expected
    # The reply ended within 8 tokens: its end-of-turn token is counted, not returned.
    assert len(ids) < 8 and reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(ids) + 1)
    stream = sdk.chat.completions.create(
        model=DEFAULT_DECODER_NAME,
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(ids) + 1
    scrape = httpx.get(f"{server.url}/metrics").text
    base = f'base="{DEFAULT_DECODER_NAME}"'
    generated = next(
        line for line in scrape.splitlines() if line.startswith("loraplex_generation_tokens_total")
    )
    assert base in generated and float(generated.split()[-1]) >= 2 * (len(ids) + 1)
    assert f"loraplex_generation_running_sequences{{{base}}} 0.0" in scrape


def test_a_prompt_starting_like_an_earlier_one_of_its_tenant_prefills_only_the_rest(
    server: Server,
) -> None:
    """Prefix caching: the second question behind the same system prompt reports the shared
    whole blocks as cached and replies as core does; another tenant's same request caches
    nothing of the first tenant's."""
    system: ChatCompletionMessageParam = {
        "role": "system",
        "content": "You are a terse geography assistant. Answer with one word.",
    }
    first: list[ChatCompletionMessageParam] = [
        system,
        {"role": "user", "content": "What is the capital of Italy?"},
    ]
    second: list[ChatCompletionMessageParam] = [
        system,
        {"role": "user", "content": "What is the capital of Spain?"},
    ]

    def ask(key: str, messages: list[ChatCompletionMessageParam]) -> tuple[str, int]:
        reply = server.sdk(key).chat.completions.create(
            model=DEFAULT_DECODER_NAME, messages=messages, max_tokens=8, temperature=0
        )
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        cached = reply.usage.prompt_tokens_details.cached_tokens
        return reply.choices[0].message.content or "", cached or 0

    template = server.decoder.tokenizer.apply_chat_template
    before = list(template(first, add_generation_prompt=True))
    prompt = list(template(second, add_generation_prompt=True))
    shared = next(i for i, (a, b) in enumerate(zip(before, prompt, strict=False)) if a != b)

    def metric(name: str) -> float:
        scrape = httpx.get(f"{server.url}/metrics").text
        line = next(line for line in scrape.splitlines() if line.startswith(name))
        return float(line.split()[-1])

    def hits() -> float:
        return metric("loraplex_generation_prefix_cached_tokens_total")

    ask(server.key, first)
    counted = hits()
    text, cached = ask(server.key, second)
    assert cached == shared // 8 * 8 > 0  # whole blocks of 8 tokens
    assert text == core_greedy(server.decoder, prompt, 8)
    assert ask(server.other_key, second) == (text, 0)
    assert hits() - counted == cached
    # The default budget (128 MiB) in blocks of 8 tokens' keys and values, in the cache's dtype.
    servers = app_state(server.app).generation
    assert servers is not None
    kv = servers[DEFAULT_DECODER_NAME].scheduler.cache.dtype
    block = bytes_per_slot(server.decoder.config, 8, kv)
    assert metric("loraplex_generation_prefix_cache_capacity_blocks") == (128 << 20) // block


def test_completions_seed_n_and_logprobs(server: Server) -> None:
    sdk = server.sdk()
    prompt = "The capital of France is"
    out = sdk.completions.create(
        model=DEFAULT_DECODER_NAME, prompt=prompt, max_tokens=5, temperature=0, logprobs=2
    )
    ids = list(server.decoder.tokenizer.encode(prompt))
    assert out.choices[0].text == core_greedy(server.decoder, ids, 5)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.token_logprobs) == 5 and all(len(t) <= 2 for t in lp.top_logprobs)
    # Greedy: each chosen token is the likeliest.
    assert all(
        v == pytest.approx(max(t.values()))
        for v, t in zip(lp.token_logprobs, lp.top_logprobs, strict=True)
        if v is not None
    )

    pieces = sdk.completions.create(
        model=DEFAULT_DECODER_NAME, prompt=prompt, max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces if c.choices) == out.choices[0].text
    chat = sdk.chat.completions.create(
        model=DEFAULT_DECODER_NAME,
        messages=QUESTION,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs
    assert content is not None and content.content is not None and len(content.content) == 4
    assert "".join(t.token for t in content.content) == chat.choices[0].message.content
    for token in content.content:
        assert len(token.top_logprobs) == 2 and token.top_logprobs[0].token == token.token
        assert bytes(token.bytes or []).decode() == token.token

    def sampled() -> list[str]:
        reply = sdk.chat.completions.create(
            model=DEFAULT_DECODER_NAME,
            messages=QUESTION,
            max_tokens=12,
            temperature=1.0,
            seed=7,
            n=2,
        )
        return [c.message.content or "" for c in reply.choices]

    first = sampled()
    assert sampled() == first  # same seed, same request: same texts
    assert first[0] != first[1]  # two candidates, two draws


def test_adapters_are_the_callers_own(server: Server) -> None:
    base = server.decoder
    config = parse_method_config(
        "lora", {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}, base_kind="decoder"
    )
    assert isinstance(config, LoraConfig)
    torch.manual_seed(0)  # A's initialisation too: the same adapter whatever ran before
    lora = LoraModel(config, base)
    with torch.no_grad():
        for b in lora.lora_B:
            b.normal_(std=0.5)
    adapter = Adapter.from_method(lora, HeadConfig(task="chat"), 1, {})
    _store(server, "smol-chat", adapter)
    sdk = server.sdk()
    reply = sdk.chat.completions.create(
        model="smol-chat",
        messages=QUESTION,
        max_tokens=6,
        temperature=0,
    )
    expected = core_greedy(base, chat_prompt(base), 6, lora)
    assert reply.choices[0].message.content == expected
    assert expected != core_greedy(base, chat_prompt(base), 6)  # the adapter matters
    # Another tenant: the same name is unknown to it, like any unknown name.
    for key, model in ((server.other_key, "smol-chat"), (server.key, "no-such-model")):
        with pytest.raises(openai.NotFoundError) as err:
            server.sdk(key).chat.completions.create(
                model=model,
                messages=QUESTION,
                max_tokens=2,
            )
        assert err.value.code == "model_not_found"
        assert err.value.param == "model"


def test_context_overflow_is_400_naming_the_limit(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        server.sdk().chat.completions.create(
            model=DEFAULT_DECODER_NAME,
            messages=QUESTION,
            max_tokens=CONTEXT,
        )
    assert err.value.code == "context_length_exceeded"
    assert f"maximum context length is {CONTEXT} tokens" in str(err.value)


def test_a_client_that_leaves_frees_its_sequence(server: Server) -> None:
    generation = app_state(server.app).generation
    assert generation is not None
    scheduler = generation[DEFAULT_DECODER_NAME].scheduler
    cancelled = scheduler.cancelled_sequences
    story: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Write a long story about a dragon and a knight."}
    ]
    body = {
        "model": DEFAULT_DECODER_NAME,
        "messages": story,
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {server.key}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=headers
    ) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk, sent before admission
        assert next(line for line in lines if '"content"' in line)  # it is generating
        assert scheduler.running == 1
    wait_until_idle(scheduler)
    # Freed by the disconnect, long before its 400 tokens (greedy, the story runs on).
    assert scheduler.running == 0
    assert scheduler.cancelled_sequences == cancelled + 1


def test_deleting_an_adapter_mid_stream_404s_after_and_frees_its_slot(server: Server) -> None:
    base = server.decoder
    config = parse_method_config("lora", {"r": 4, "target_modules": ["o_proj"]}, "decoder")
    assert isinstance(config, LoraConfig)
    _store(
        server,
        "short-lived",
        Adapter.from_method(LoraModel(config, base), HeadConfig(task="chat"), 1, {}),
    )
    generation = app_state(server.app).generation
    assert generation is not None
    scheduler = generation[DEFAULT_DECODER_NAME].scheduler
    sdk = server.sdk()
    stream = sdk.chat.completions.create(
        model="short-lived", messages=QUESTION, max_tokens=40, temperature=0, stream=True
    )
    chunks = iter(stream)
    next(chunks)
    sdk.models.delete("short-lived")
    # The running sequence finishes with the weights it started with ...
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason in ("stop", "length")
    # ... later requests find no such model, and the bank lets the adapter go.
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="short-lived", messages=QUESTION, max_tokens=2)
    # The scheduler applies the deletion at its next step, which a loaded machine may not have
    # run yet when the last sequence retires: wait for both.
    assert wait_until(
        lambda: (
            not scheduler.running
            and all(key[1] != "short-lived" for key in scheduler.adapters.resident_keys())
        )  # type: ignore[index]
    )
    resident = scheduler.adapters.resident_keys()
    assert len(scheduler.adapters.bank) == len(resident)  # its slot freed, not just hidden


def test_best_of_n_ranks_candidates_by_the_reward_adapter(server: Server) -> None:
    from core.decoder.scoring import score_decoder_pairs
    from core.heads import Head

    base = server.decoder
    config = parse_method_config("lora", {"r": 2, "target_modules": ["q_proj"]}, "decoder")
    assert isinstance(config, LoraConfig)
    head_config = HeadConfig(task="reward", pooling="last_token", max_seq_length=128)
    torch.manual_seed(1)
    head = Head(head_config, base.config.hidden_size)
    adapter = Adapter.from_method(
        LoraModel(config, base), head_config, 1, {}, head_state=head.state_dict()
    )
    _store(server, "smol-reward", adapter)
    chat = Adapter.from_method(LoraModel(config, base), HeadConfig(task="chat"), 1, {})
    _store(server, "bon-chat", chat)
    sdk = server.sdk()
    reply = sdk.chat.completions.create(
        model=DEFAULT_DECODER_NAME,
        messages=QUESTION,
        max_tokens=8,
        temperature=1.0,
        seed=3,
        n=3,
        extra_body={"reward_adapter": "smol-reward"},
    )
    rewards = [float((c.model_extra or {})["reward"]) for c in reply.choices]
    assert rewards == sorted(rewards, reverse=True)  # best first
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    texts = [c.message.content or "" for c in reply.choices]
    expected = score_decoder_pairs(
        adapter.build_decoder_head(base), [QUESTION[0]["content"]] * 3, texts
    )
    assert rewards == pytest.approx(expected.tolist(), abs=1e-4)
    # The reward adapter must be the caller's own reward model, and the reply whole.
    for key, name, error in (
        (server.other_key, "smol-reward", openai.NotFoundError),
        (server.key, "bon-chat", openai.UnprocessableEntityError),
    ):
        with pytest.raises(error) as err:
            server.sdk(key).chat.completions.create(
                model=DEFAULT_DECODER_NAME,
                messages=QUESTION,
                max_tokens=2,
                extra_body={"reward_adapter": name},
            )
        assert err.value.param == "reward_adapter"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(
            model=DEFAULT_DECODER_NAME,
            messages=QUESTION,
            max_tokens=2,
            stream=True,
            extra_body={"reward_adapter": "smol-reward"},
        )


def _store(server: Server, name: str, adapter: Adapter) -> None:
    """Insert ``adapter`` for the default tenant, as a finished job would."""
    from service.adapters.records import next_adapter_version
    from service.adapters.store import adapter_row_from
    from service.db.models import ApiKey
    from service.tenants.keys import hash_api_key

    state = app_state(server.app)
    with state.sessionmaker() as session:
        tenant_id = (
            session.query(ApiKey).filter_by(key_hash=hash_api_key(server.key)).one().tenant_id
        )
        row = adapter_row_from(adapter, server.decoder, name=name)
        row.tenant_id = tenant_id
        row.version = next_adapter_version(session, tenant_id)
        session.add(row)
        session.commit()


def test_a_stream_whose_client_left_before_its_first_chunk_frees_its_sequence(
    server: Server,
) -> None:
    """The client is gone when the response starts (the send of its headers fails), so the
    body's generator never runs: the request must still be cancelled and its sink dropped."""
    generation = app_state(server.app).generation
    assert generation is not None
    gen_server = generation[DEFAULT_DECODER_NAME]
    body = json.dumps(
        {"model": DEFAULT_DECODER_NAME, "messages": QUESTION, "max_tokens": 400, "stream": True}
    ).encode()
    scope = json_post_scope("/v1/chat/completions", body, f"Bearer {server.key}")
    started: list[int] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            started.append(int(message["status"]))  # type: ignore[call-overload]
            raise OSError("the client is gone")

    async def call() -> None:
        # However the middleware reports a response that could not start.
        with pytest.raises((ClientDisconnect, RuntimeError)):
            await server.app(scope, receive, send)  # type: ignore[arg-type]

    asyncio.run(call())
    assert started == [200]
    assert gen_server._sinks == {}  # nothing left waiting for events nobody reads
    wait_until_idle(gen_server.scheduler)
    assert gen_server.scheduler.running == 0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_stream_options_without_stream_is_refused(server: Server, path: str) -> None:
    body = {
        "model": DEFAULT_DECODER_NAME,
        "stream_options": {"include_usage": True},
        "max_tokens": 2,
        **({"prompt": "Paris is"} if path == "/v1/completions" else {"messages": QUESTION}),
    }
    resp = httpx.post(
        f"{server.url}{path}", json=body, headers={"Authorization": f"Bearer {server.key}"}
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["param"] == "stream_options"


def test_streamed_logprobs_equal_the_whole_response_s(server: Server) -> None:
    sdk = server.sdk()
    asked = {"model": DEFAULT_DECODER_NAME, "max_tokens": 5, "temperature": 0}
    whole = sdk.chat.completions.create(messages=QUESTION, logprobs=True, top_logprobs=2, **asked)
    chunks = sdk.chat.completions.create(
        messages=QUESTION, logprobs=True, top_logprobs=2, stream=True, **asked
    )
    streamed = [
        t
        for c in chunks
        if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content
        for t in c.choices[0].logprobs.content
    ]
    assert whole.choices[0].logprobs and whole.choices[0].logprobs.content
    assert [t.model_dump() for t in streamed] == [
        t.model_dump() for t in whole.choices[0].logprobs.content
    ]

    prompt = "The capital of France is"
    out = sdk.completions.create(prompt=prompt, logprobs=2, **asked)
    pieces = [
        c.choices[0].logprobs
        for c in sdk.completions.create(prompt=prompt, logprobs=2, stream=True, **asked)
        if c.choices and c.choices[0].logprobs
    ]
    expected = out.choices[0].logprobs
    assert expected is not None
    assert [t for p in pieces for t in p.tokens or []] == expected.tokens
    assert [v for p in pieces for v in p.token_logprobs or []] == expected.token_logprobs
    assert [o for p in pieces for o in p.text_offset or []] == expected.text_offset


def test_replies_keep_every_character_and_name_tokens_by_their_bytes(server: Server) -> None:
    """Decoding with Hugging Face's clean-up of spaces lost characters (" 's" -> "'"), and
    logprobs named a token holding part of a character U+FFFD, with U+FFFD's bytes."""
    sdk = server.sdk()
    asked = {"model": DEFAULT_DECODER_NAME, "temperature": 0, "max_tokens": 12}
    prompt = "He said 'so what' and she said 'so what' and they said 'so what' and we said"
    said = sdk.completions.create(prompt=prompt, logprobs=0, **asked).choices[0]
    assert said.logprobs is not None and said.logprobs.tokens
    assert "".join(said.logprobs.tokens) == said.text and "'o what'" not in said.text

    emoji = "🍕🍕🍕🍕🍕🍕🍕🍕"  # SmolLM2 spells 🍕 in three tokens: f0 9f | 8d | 95
    chat = sdk.chat.completions.create(
        messages=[{"role": "user", "content": f"Repeat: {emoji}"}], logprobs=True, **asked
    ).choices[0]
    assert chat.logprobs is not None and chat.logprobs.content
    tokens = chat.logprobs.content
    assert b"".join(bytes(t.bytes or []) for t in tokens).decode() == chat.message.content
    assert "🍕" in (chat.message.content or "")
    assert {t.token for t in tokens} >= {"bytes:\\xf0\\x9f", "bytes:\\x8d", "bytes:\\x95"}

    whole = sdk.completions.create(prompt=emoji, logprobs=1, **asked).choices[0]
    assert whole.text.startswith("🍕") and whole.logprobs is not None
    streamed = [
        c.choices[0].logprobs
        for c in sdk.completions.create(prompt=emoji, logprobs=1, stream=True, **asked)
        if c.choices and c.choices[0].logprobs
    ]
    # A token starts where the character it (partly) spells does.
    pizza = ["bytes:\\xf0\\x9f", "bytes:\\x8d", "bytes:\\x95"]
    assert whole.logprobs.tokens[:6] == pizza * 2
    assert whole.logprobs.text_offset[:6] == [0, 0, 0, 1, 1, 1]
    assert [o for p in streamed for o in p.text_offset or []] == whole.logprobs.text_offset
    assert [t for p in streamed for t in p.tokens or []] == whole.logprobs.tokens


def test_a_tiny_temperature_is_greedy_and_null_parameters_are_defaults(server: Server) -> None:
    """temperature 1e-40 overflowed to a NaN distribution: a 500, for every request sharing its
    step. The SDK sends null for a parameter given as None, which OpenAI reads as its default."""
    sdk = server.sdk()
    asked = {"model": DEFAULT_DECODER_NAME, "messages": QUESTION, "max_tokens": 6}
    greedy = sdk.chat.completions.create(temperature=0, **asked).choices[0].message.content
    tiny = sdk.chat.completions.create(temperature=1e-40, **asked).choices[0].message.content
    assert tiny == greedy
    nulls = sdk.chat.completions.create(
        temperature=None,
        top_p=None,
        n=None,
        logprobs=None,
        seed=3,
        # Unimplemented, but asking for nothing: null (the SDK's None), or the neutral value.
        presence_penalty=None,
        frequency_penalty=0,
        logit_bias={},
        tools=None,
        response_format=None,
        extra_body={"mode": None},
        **asked,
    )
    seeded = sdk.chat.completions.create(seed=3, **asked)
    assert len(nulls.choices) == 1 and nulls.choices[0].logprobs is None
    assert nulls.choices[0].message.content == seeded.choices[0].message.content
    completion = {"model": DEFAULT_DECODER_NAME, "prompt": "Paris is", "max_tokens": 3}
    plain = sdk.completions.create(temperature=0, **completion).choices[0].text
    neutral = sdk.completions.create(temperature=0, echo=None, suffix=None, best_of=1, **completion)
    assert neutral.choices[0].text == plain
    streamed = sdk.completions.create(
        temperature=0, stream=True, stream_options={"include_usage": None}, **completion
    )  # a nested null too
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain
    assert all(c.usage is None for c in chunks)


def test_a_tiny_top_p_is_greedy_and_fails_no_request_beside_it(server: Server) -> None:
    """top_p 1e-46 is 0 in float32: it kept no token, and torch.multinomial failed the request
    and every other one in its step with a 500."""
    sdk = server.sdk()
    asked = {"model": DEFAULT_DECODER_NAME, "messages": QUESTION, "max_tokens": 6}
    greedy = sdk.chat.completions.create(temperature=0, **asked).choices[0].message.content
    with ThreadPoolExecutor(8) as pool:
        tiny = [
            pool.submit(sdk.chat.completions.create, top_p=top_p, seed=i, **asked)
            for i, top_p in enumerate((1e-46, 5e-324, 1e-46, 5e-324))
        ]
        beside = [pool.submit(sdk.chat.completions.create, seed=i, **asked) for i in range(4)]
        assert [f.result().choices[0].message.content for f in tiny] == [greedy] * 4
        assert all(f.result().choices[0].finish_reason for f in beside)


@pytest.mark.parametrize(
    ("path", "field", "param", "says"),
    [
        ("completions", {"stop": ["a"] * 5}, "stop", "at most 4 stop strings"),
        ("completions", {"stop": "a" * 65}, "stop", "each stop string needs 1 to 64 characters"),
        ("completions", {"stop": [3]}, "stop", "must be a string or a list of strings"),
        # Read strictly, as OpenAI does: these were read as 2, 1 token, a stream, greedy.
        ("completions", {"max_tokens": "2"}, "max_tokens", "valid integer"),
        ("completions", {"max_tokens": True}, "max_tokens", "valid integer"),
        ("completions", {"stream": "yes"}, "stream", "valid boolean"),
        ("completions", {"temperature": "0"}, "temperature", "valid number"),
        ("completions", {"n": 2.0}, "n", "valid integer"),
        (
            "completions",
            {"stream": True, "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
            "valid boolean",
        ),
        ("completions", {"presence_penalty": 0.5}, "presence_penalty", "not permitted"),
        (
            "chat/completions",
            {"content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            "messages.0.content.0.type",
            "'text'",
        ),
        (
            "chat/completions",
            {"content": 5},
            "messages.0.content",
            "a string or a list of text parts",
        ),
        (
            "chat/completions",
            {"content": "a" * 100_001},
            "messages.0.content",
            "at most 100000 characters",
        ),
    ],
)
def test_a_bad_parameter_or_message_content_is_422_naming_the_field_sent(
    server: Server, path: str, field: dict[str, object], param: str, says: str
) -> None:
    if path == "completions":
        body = {"prompt": "Paris is", "max_tokens": 2, **field}
    else:
        body = {"messages": [{"role": "user", **field}]}
    resp = httpx.post(
        f"{server.url}/v1/{path}",
        json={"model": DEFAULT_DECODER_NAME, **body},
        headers={"Authorization": f"Bearer {server.key}"},
    )
    assert_error(resp, 422, param=param, contains=says)


def _generation_metrics(server: Server) -> dict[tuple[str, str], float]:
    """The default decoder's ``loraplex_generation_*`` samples by (name, ``weights`` label)."""
    scrape = httpx.get(f"{server.url}/metrics").text
    return {
        (sample.name, sample.labels.get("weights", "")): sample.value
        for family in text_string_to_metric_families(scrape)
        for sample in family.samples
        if sample.name.startswith("loraplex_generation_")
        and sample.labels.get("base") == DEFAULT_DECODER_NAME
    }


def test_an_adapter_whose_weights_overflow_is_409_and_fails_no_request_beside_it(
    server: Server,
) -> None:
    """NaN weights (stored before imports checked them, or trained so) gave NaN scores, which
    failed every request of the step with a 500, another tenant's included."""
    config = parse_method_config("lora", {"r": 4, "alpha": 8}, base_kind="decoder")
    assert isinstance(config, LoraConfig)
    lora = LoraModel(config, server.decoder)
    with torch.no_grad():
        lora.lora_B[0].fill_(float("nan"))
    _store(server, "smol-nan", Adapter.from_method(lora, HeadConfig(task="chat"), 1, {}))
    sdk = server.sdk()
    asked = {"messages": QUESTION, "max_tokens": 6}
    greedy = sdk.chat.completions.create(model=DEFAULT_DECODER_NAME, temperature=0, **asked)
    with ThreadPoolExecutor(6) as pool:
        bad = [
            pool.submit(sdk.chat.completions.create, model="smol-nan", n=2, seed=i, **asked)
            for i in range(3)
        ]
        beside = [
            pool.submit(
                sdk.chat.completions.create, model=DEFAULT_DECODER_NAME, temperature=0, **asked
            )
            for _ in range(3)
        ]
        for future in bad:
            with pytest.raises(openai.APIStatusError) as failed:
                future.result()
            assert failed.value.status_code == 409
            error = failed.value.body
            assert isinstance(error, dict)
            assert (error["code"], error["param"]) == ("non_finite_output", "model")
            assert "not finite numbers" in error["message"]
        texts = [f.result().choices[0].message.content for f in beside]
    assert texts == [greedy.choices[0].message.content] * 3


def test_mode_merged_replies_as_unmerged_and_shows_on_metrics(server: Server) -> None:
    base = server.decoder
    config = parse_method_config("lora", {"r": 4, "alpha": 8}, base_kind="decoder")
    assert isinstance(config, LoraConfig)
    torch.manual_seed(1)
    lora = LoraModel(config, base)
    with torch.no_grad():
        for b in lora.lora_B:
            b.normal_(std=0.05)
    _store(server, "smol-merged", Adapter.from_method(lora, HeadConfig(task="chat"), 1, {}))
    servers = app_state(server.app).generation
    assert servers is not None
    scheduler = servers[DEFAULT_DECODER_NAME].scheduler
    # All seven targets on every layer: the copy is every linear of the base, in its dtype.
    copy_bytes = sum(
        w.numel() * w.element_size()
        for layer in scheduler.weights.layers
        for w, _ in layer.linears.values()
    )
    texts = {}
    for mode in ("merged", "unmerged"):
        before = _generation_metrics(server)
        reply = server.sdk().chat.completions.create(
            model="smol-merged",
            messages=QUESTION,
            max_tokens=6,
            temperature=0,
            extra_body={"mode": mode},
        )
        after = _generation_metrics(server)
        texts[mode] = reply.choices[0].message.content
        assert reply.usage is not None
        # Alone in the batch: every decode step after the prefill's token ran merged, or none;
        # the copy is built once, by the merged request, and kept for the adapter's next ones.
        decode_steps = reply.usage.completion_tokens - 1
        moved = {k: after[k] - before[k] for k in before}
        for weights, steps in {"merged": 0, "unmerged": 0, mode: decode_steps}.items():
            assert moved["loraplex_generation_decode_steps_total", weights] == steps
        merged = mode == "merged"
        assert moved["loraplex_generation_merges_total", ""] == merged
        assert (moved["loraplex_generation_merge_seconds_total", ""] > 0) == merged
        assert after["loraplex_generation_merged_bytes", ""] == copy_bytes
        # Unmerged, the adapter's pairs are copied into the decode layout once as it starts
        # running, and the copy goes with the request.
        assert moved["loraplex_generation_adapter_copies_total", ""] == (
            not merged and decode_steps > 0
        )
        assert after["loraplex_generation_adapter_copy_bytes", ""] == 0
        # The merged request's prompt was prefilled before its copy was built.
        assert moved["loraplex_generation_merged_prefills_total", ""] == 0
    # The adapter's next request (auto) runs on the copy from its prefill on.
    before = _generation_metrics(server)
    reply = server.sdk().chat.completions.create(
        model="smol-merged", messages=QUESTION, max_tokens=6, temperature=0
    )
    moved = {k: v - before[k] for k, v in _generation_metrics(server).items()}
    assert moved["loraplex_generation_merged_prefills_total", ""] == 1
    assert moved["loraplex_generation_merges_total", ""] == 0
    texts["auto"] = reply.choices[0].message.content
    greedy_text = core_greedy(base, chat_prompt(base), 6, lora)
    assert texts == {"merged": greedy_text, "unmerged": greedy_text, "auto": greedy_text}
