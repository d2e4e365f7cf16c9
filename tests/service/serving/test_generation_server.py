"""GenerationServer on the tiny random Llama: the scheduler's refusals as service errors, events
delivered onto the event loop, a cancelled request's slot given back, and the torch threads
its owner thread computes on."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from core.decoder.base import DecoderBase, load_decoder_base
from core.generation.sampling import SamplingParams
from core.generation.scheduler import GenerationRequest, Scheduler, SequenceEvent
from service.config import Settings
from service.errors import ErrorKind, ServiceError
from service.main import create_app
from service.serving.generation import GenerationServer
from service.serving.lifespan import serving
from service.serving.queries import AdapterGone, AdapterKey
from service.state import app_state
from tests.core.decoder.tiny_llama import TINY_LLAMA_NAME, build_tiny_llama
from tests.service.helpers import default_auth, tiny_bases_settings
from tests.tiny_bert import TINY_NAME


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> DecoderBase:
    folder = build_tiny_llama(Path(tmp_path_factory.mktemp("tiny-llama")))
    return load_decoder_base(folder, name=TINY_LLAMA_NAME, device="cpu")


def _gone(key: AdapterKey) -> object:
    raise AdapterGone(f"{key} was deleted")


def make_server(decoder: DecoderBase, slots: int = 1, waiting: int = 1) -> GenerationServer:
    scheduler = Scheduler(
        decoder.weights,
        decoder.tokenizer,
        num_slots=slots,
        capacity=64,
        max_waiting=waiting,
    )
    return GenerationServer(decoder, scheduler, _gone, threads=1)  # type: ignore[arg-type]


def request(max_tokens: int, owner: str | None = None) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return GenerationRequest([5, 6, 7], params, owner=owner)


def record_step_threads(server: GenerationServer) -> list[int]:
    """The torch threads of every scheduler step from now on, read on the owner thread."""
    seen: list[int] = []
    step = server.scheduler.step

    def recording_step() -> list[SequenceEvent]:
        seen.append(torch.get_num_threads())
        return step()

    server.scheduler.step = recording_step  # type: ignore[method-assign]
    return seen


def test_refusals_are_service_errors(decoder: DecoderBase) -> None:
    server = make_server(decoder)

    async def run() -> None:
        server.submit(request(4), "messages")  # waits: the thread is not started
        with pytest.raises(ServiceError) as full:
            server.submit(request(4), "messages")
        assert full.value.kind == ErrorKind.UNAVAILABLE and full.value.retry_after == 1
        with pytest.raises(ServiceError) as long:
            server.submit(request(62), "prompt")
        assert long.value.kind == ErrorKind.UNSUPPORTED
        assert (long.value.code, long.value.param) == ("context_length_exceeded", "prompt")
        assert "maximum context length is 64 tokens" in long.value.message

    asyncio.run(run())
    with pytest.raises(ServiceError) as gone:
        server.lora_weights(("tenant", "deleted", 3))
    assert gone.value.kind == ErrorKind.NOT_FOUND and gone.value.param == "model"


def test_a_full_queue_refuses_its_own_tenant_only(decoder: DecoderBase) -> None:
    server = make_server(decoder, waiting=1)

    async def run() -> None:
        server.submit(request(4, owner="a"), "messages")  # waits: the thread is not started
        with pytest.raises(ServiceError) as full:
            server.submit(request(4, owner="a"), "messages")
        assert full.value.code == "generation_queue_full"
        assert "1 of your generation requests are already waiting" in full.value.message
        server.submit(request(4, owner="b"), "messages")  # b's queue is its own
        assert server.scheduler.waiting == 2

    asyncio.run(run())


def test_events_arrive_and_a_cancel_frees_the_slot(decoder: DecoderBase) -> None:
    server = make_server(decoder, slots=1, waiting=4)
    server.start()

    async def run() -> tuple[int, str]:
        long = server.submit(request(60), "messages")
        first = await long.queue.get()
        assert first[0].request_id == long.request_id
        short = server.submit(request(3), "messages")  # waits for the one slot
        long.cancel()
        tokens, text = 0, ""
        async for event in short.events():
            tokens += len(event.token_ids)
            text += event.text
        return tokens, text

    try:
        tokens, _ = asyncio.run(run())
    finally:
        server.stop()
    assert tokens == 3  # the short request ran to its end once the long one was cancelled
    assert server.scheduler.running == 0 and server.scheduler.free_slots == 1


def test_a_deleted_adapter_leaves_the_bank_even_once_its_weights_left_the_cache(
    decoder: DecoderBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weights cache keeps the last few adapters read; the bank may hold more. Deleting an
    adapter whose weights the cache has already dropped must still free its bank slot."""
    from core.adapter import Adapter
    from core.heads import HeadConfig
    from core.methods import parse_method_config
    from core.methods.lora.model import LoraModel
    from service.serving import generation

    config = parse_method_config("lora", {"r": 2, "target_modules": ["q_proj"]}, "decoder")
    adapter = Adapter.from_method(LoraModel(config, decoder), HeadConfig(task="chat"), 1, {})
    scheduler = Scheduler(decoder.weights, decoder.tokenizer, num_slots=1, capacity=64)
    server = GenerationServer(decoder, scheduler, lambda key: adapter, threads=1)
    monkeypatch.setattr(generation, "WEIGHTS_CACHE_ENTRIES", 0)  # read, used, then dropped
    key = ("tenant", "chat", 1)
    server.start()

    async def run() -> None:
        weights = server.lora_weights(key)
        params = SamplingParams(max_tokens=2, temperature=0.0)
        async for _ in server.submit(GenerationRequest([5, 6], params, weights), "p").events():
            pass

    try:
        asyncio.run(run())
        assert scheduler.adapters.resident_keys() == [key]  # in the bank, not in the cache
        server.forget("tenant", "chat")
        deadline = time.monotonic() + 10  # the owner thread applies it at its next step
        while scheduler.adapters.resident_keys() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        server.stop()
    assert scheduler.adapters.resident_keys() == []


def test_a_prompt_longer_than_the_context_can_hold_is_refused_before_tokenizing(
    decoder: DecoderBase,
) -> None:
    """A byte-level token stands for at most its vocabulary entry's characters (13 here), so
    a prompt of more than 64 x 13 characters cannot fit in 64 tokens: refused naming the
    limit without tokenizing it (1 MiB held the tokenizer lock for seconds). One character
    less is tokenized, and the scheduler's own check refuses it."""
    from service.serving.generation import max_token_chars

    server = make_server(decoder)
    per_token = max_token_chars(decoder.tokenizer)
    assert per_token == max(len(t) for t in decoder.tokenizer.get_vocab()) == 13
    bound = server.context_length * per_token
    encoders: list[tuple[Callable[[str, str], object], str]] = [
        (server.encode_text, "prompt"),
        (lambda text, p: server.encode_chat([{"role": "user", "content": text}], p), "messages.0"),
    ]
    for encode, param in encoders:
        for text in ("x" * (bound + 1), "x" * (1 << 20)):
            with pytest.raises(ServiceError) as long:
                encode(text, param)
            assert (long.value.code, long.value.param) == ("context_length_exceeded", param)
            assert "maximum context length is 64 tokens" in long.value.message
            assert f"the prompt's {len(text)} characters" in long.value.message
    assert len(server.encode_text("x" * bound)) > server.context_length  # not refused early
    assert server.encode_text("hello") == list(decoder.tokenizer.encode("hello"))


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    ("overrides", "threads"),
    [
        # The encoder's compute thread sets 2 threads, the last count set before the owner
        # thread starts: it must not inherit it.
        ({"torch_threads": 2, "inference_workers": 1, "generation_threads": 1}, 1),
        # Default: the serving budget, not the encoder workers' share of it (1 each).
        ({"torch_threads": 2, "inference_workers": 2}, 2),
    ],
)
def test_the_owner_thread_computes_on_the_generation_thread_budget(
    settings: Settings,
    tiny_model_dir: Path,
    tiny_llama_dir: Path,
    overrides: dict[str, int],
    threads: int,
) -> None:
    app_settings = tiny_bases_settings(
        settings, tiny_model_dir, tiny_llama_dir, TINY_NAME, TINY_LLAMA_NAME, **overrides
    )
    before = torch.get_num_threads()
    try:
        with TestClient(create_app(app_settings, hooks=[serving])) as client:
            generation = app_state(client.app).generation
            assert generation is not None
            server = generation[TINY_LLAMA_NAME]
            seen = record_step_threads(server)
            body = {"model": TINY_LLAMA_NAME, "prompt": "hi", "max_tokens": 2}
            resp = client.post("/v1/completions", json=body, headers=default_auth(app_settings))
            assert resp.status_code == 200, resp.text
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {threads}


def test_each_step_computes_on_the_threads_the_lender_gives(decoder: DecoderBase) -> None:
    from service.serving.cores import CoreLender

    busy = {"worker": False}
    server = make_server(decoder)
    server.lender = CoreLender(1, 1, [lambda: busy["worker"]])
    seen = record_step_threads(server)
    server.start()

    async def generate() -> None:
        async for _ in server.submit(request(3), "messages").events():
            pass

    try:
        asyncio.run(generate())
        lent, seen[:] = list(seen), []
        busy["worker"] = True
        asyncio.run(generate())
    finally:
        server.stop()
    assert lent and set(lent) == {2}  # the budget and the worker's idle core
    assert seen and set(seen) == {1}  # the budget alone while the worker is busy
    assert server.step_threads == 1


@pytest.mark.sqlite_only
def test_with_the_default_split_generation_borrows_the_idle_workers_cores(
    settings: Settings, tiny_model_dir: Path, tiny_llama_dir: Path
) -> None:
    """``loraplex serve``'s default: serving on half the cores, the embedded worker on the
    rest, which a generation step borrows while the worker's process idles."""
    import os
    import subprocess
    import sys

    from service.serving.cores import WINDOW_S

    cores = os.cpu_count() or 1
    if cores < 2:
        pytest.skip("one core: nothing to lend")
    # The worker's setting on but not its hook: the test plays the worker's process.
    app_settings = tiny_bases_settings(
        settings,
        tiny_model_dir,
        tiny_llama_dir,
        TINY_NAME,
        TINY_LLAMA_NAME,
        embedded_worker=True,
        torch_threads=None,
    )
    idle_worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    before = torch.get_num_threads()
    try:
        with TestClient(create_app(app_settings, hooks=[serving])) as client:
            state = app_state(client.app)
            assert state.generation is not None
            server = state.generation[TINY_LLAMA_NAME]
            lender = server.lender
            assert lender is not None and lender.budget == cores // 2
            assert lender.threads() == cores // 2  # no worker process known: busy
            state.worker_pid = idle_worker.pid
            # Lent once a window has shown that process idle (and no batch ran for a second).
            deadline = time.monotonic() + 10 * WINDOW_S + 2
            while lender.threads() != cores and time.monotonic() < deadline:
                time.sleep(WINDOW_S / 5)
            assert lender.threads() == cores
            # Sampled on, as a server's steps would: a request reaching its first step over
            # two windows after the last sample (a loaded CI machine) reads as a job that
            # just started, and runs on the budget alone.
            sampled = threading.Event()

            def keep_sampling() -> None:
                while not sampled.wait(WINDOW_S / 5):
                    lender.threads()

            sampler = threading.Thread(target=keep_sampling, daemon=True)
            sampler.start()
            seen = record_step_threads(server)
            body = {"model": TINY_LLAMA_NAME, "prompt": "hi", "max_tokens": 2}
            resp = client.post("/v1/completions", json=body, headers=default_auth(app_settings))
            sampled.set()
            sampler.join()
            assert resp.status_code == 200, resp.text
            scrape = client.get("/metrics").text
    finally:
        idle_worker.kill()
        idle_worker.wait()
        torch.set_num_threads(before)
    assert seen and set(seen) == {cores}
    gauge = f'loraplex_generation_step_threads{{base="{TINY_LLAMA_NAME}"}} {float(cores)}'
    assert gauge in scrape.splitlines()


def test_a_lender_that_fails_leaves_the_step_on_the_budget(decoder: DecoderBase) -> None:
    """Nothing may end the owner thread: every request would wait forever."""
    from service.serving.cores import CoreLender

    def broken() -> bool:
        raise ValueError("unreadable /proc")

    server = make_server(decoder)
    server.lender = CoreLender(1, 1, [broken])
    server.start()

    async def generate() -> int:
        tokens = 0
        async for event in server.submit(request(3), "messages").events():
            tokens += len(event.token_ids)
        return tokens

    try:
        assert asyncio.run(asyncio.wait_for(generate(), 60)) == 3
    finally:
        server.stop()
    assert server.step_threads == 1
