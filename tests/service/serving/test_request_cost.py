"""What one /predict may cost every tenant: its texts are tokenized in the request's own thread
(never on the batcher's owner thread), no further than the model's window, and a request's
characters are bounded (LORAPLEX_MAX_REQUEST_CHARS)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.base import FrozenBase
from core.inference import Row
from core.inference.tokens import MAX_CHARS_PER_TOKEN
from core.pair_encoding import cut_at_word
from service.serving.queries import AdapterRef
from service.serving.run import RequestTokenizer
from service.state import app_state
from tests.core.inference.helpers import lora, random_adapter, spy_tokenizer
from tests.service.helpers import SMALL_REQUEST_CHARS, Headers, assert_error, store_adapter

LIMIT = SMALL_REQUEST_CHARS
WAIT_S = 30.0


@pytest.fixture
def tokenizer_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(thread name, longest string handed to the tokenizer) of every tokenizer call."""
    return spy_tokenizer(monkeypatch)


@pytest.mark.parametrize("serving_client", [1, 2], ids=["1-worker", "2-workers"], indirect=True)
def test_the_batcher_thread_never_tokenizes(
    serving_client: TestClient, auth: Headers, tokenizer_calls: list[tuple[str, int]]
) -> None:
    base = app_state(serving_client.app).require_base_model()
    store_adapter(serving_client, auth, "cls", lora(base, r=4, seed=1))
    store_adapter(serving_client, auth, "rm", random_adapter(base, "lora", {"r": 2}, None))
    long_text = "a rather long text " * 5000  # 95,000 characters
    inputs = [long_text, "one", ["a", "pair"], {"text": long_text, "text_pair": "b"}]
    resp = serving_client.post("/predict?adapter=cls", json={"inputs": inputs}, headers=auth)
    assert resp.status_code == 200, resp.text
    compare = {"prompt": "p", "response_a": long_text, "response_b": "short"}
    resp = serving_client.post("/reward/compare?adapter=rm", json=compare, headers=auth)
    assert resp.status_code == 200, resp.text

    threads = {name for name, _ in tokenizer_calls}
    assert threads, "the requests were tokenized"
    batcher_threads = {t.name for t in threading.enumerate() if t.name.startswith("inference")}
    assert batcher_threads, "the batcher's threads are running"
    assert not threads & batcher_threads
    bound = base.max_length * MAX_CHARS_PER_TOKEN
    cut = len(cut_at_word(long_text, bound, keep_end=False))  # at the bound's last word boundary
    assert max(length for _, length in tokenizer_calls) == cut  # never the whole 95,000


def test_a_request_over_max_request_chars_is_refused(
    small_client: TestClient, auth: Headers
) -> None:
    base = app_state(small_client.app).require_base_model()
    store_adapter(small_client, auth, "cls", lora(base, r=4, seed=1))
    store_adapter(small_client, auth, "rm", random_adapter(base, "lora", {"r": 2}, None))

    fits = ["x" * (LIMIT // 4)] * 4
    ok = small_client.post("/predict?adapter=cls", json={"inputs": fits}, headers=auth)
    assert ok.status_code == 200, ok.text
    over = small_client.post("/predict?adapter=cls", json={"inputs": [*fits, "y"]}, headers=auth)
    assert_error(over, 413, param="inputs", code="request_too_large")
    assert f"at most {LIMIT}" in over.json()["error"]["message"]

    half = "z" * (LIMIT // 2)
    pair = {"prompt": "p", "response_a": half, "response_b": half}
    over = small_client.post("/reward/compare?adapter=rm", json=pair, headers=auth)
    assert_error(over, 413, param="pairs", code="request_too_large")


@pytest.mark.parametrize("serving_client", [1], ids=["1-worker"], indirect=True)
def test_prompt_tuning_inputs_are_bounded_by_its_own_window(
    serving_client: TestClient, auth: Headers
) -> None:
    base = app_state(serving_client.app).require_base_model()
    n = 8
    adapter = random_adapter(base, "prompt_tuning", {"n_virtual_tokens": n})
    store_adapter(serving_client, auth, "pt", adapter)
    window = base.max_length - n
    text = " ".join(["a"] * (window - 1))  # window + 1 tokens with [CLS] and [SEP]

    refused = serving_client.post(
        "/predict?adapter=pt", json={"inputs": [text], "truncate": False}, headers=auth
    )
    assert_error(refused, 422, param="inputs.0", code="input_too_long")
    assert f"at most {window}" in refused.json()["error"]["message"]
    fits = serving_client.post(
        "/predict?adapter=pt",
        json={"inputs": [text[: -len(" a")]], "truncate": False},
        headers=auth,
    )
    assert fits.status_code == 200, fits.text
    cut = serving_client.post("/predict?adapter=pt", json={"inputs": [text * 50]}, headers=auth)
    assert cut.status_code == 200, cut.text


@pytest.mark.parametrize("serving_client", [1], ids=["1-worker"], indirect=True)
def test_inputs_are_served_at_the_length_the_adapter_was_trained_at(
    serving_client: TestClient, auth: Headers
) -> None:
    """The request path encodes at the head's max_seq_length (as training did), not at the
    base's window: a longer input is refused without truncate, and cut to it with."""
    from dataclasses import replace

    adapter = lora(app_state(serving_client.app).require_base_model(), r=2)
    trained = replace(adapter, head=adapter.head.model_copy(update={"max_seq_length": 16}))
    store_adapter(serving_client, auth, "short", trained)
    text = " ".join(["a"] * 15)  # 17 tokens with [CLS] and [SEP]

    refused = serving_client.post(
        "/predict?adapter=short", json={"inputs": [text], "truncate": False}, headers=auth
    )
    assert_error(refused, 422, param="inputs.0", code="input_too_long")
    assert "at most 16" in refused.json()["error"]["message"]
    cut = serving_client.post("/predict?adapter=short", json={"inputs": [text]}, headers=auth)
    whole = serving_client.post(
        "/predict?adapter=short", json={"inputs": [text[: -len(" a")]]}, headers=auth
    )
    assert cut.status_code == 200 and whole.status_code == 200, cut.text
    assert cut.json() == whole.json()  # the same 16 tokens


def test_a_tenant_tokenizes_one_request_at_a_time(
    tiny_base: FrozenBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's other requests wait on the event loop while one of its requests is tokenized: they
    hold no worker thread and no tokenizer copy, and B's request is tokenized meanwhile."""
    tokenizer = RequestTokenizer(tiny_base)
    tokenize = tokenizer.rows
    held = threading.Event()  # A's requests are slow to tokenize until set
    entered: list[str] = []

    def rows(ref: AdapterRef, *args: Any) -> list[Row]:
        entered.append(ref.key[0])
        if ref.key[0] == "A":
            held.wait()
        return tokenize(ref, *args)

    monkeypatch.setattr(tokenizer, "rows", rows)

    def ref(tenant: str) -> AdapterRef:
        return AdapterRef("id", (tenant, "cls", 1), "classification", "lora", ("a", "b"), False, 0)

    async def main() -> None:
        def request(tenant: str) -> asyncio.Future[list[Row]]:
            work = tokenizer.rows_in_turn(ref(tenant), [("a text", None)], True, "inputs")
            return asyncio.ensure_future(work)

        first, second = request("A"), request("A")
        while not entered:
            await asyncio.sleep(0.01)
        other = await asyncio.wait_for(request("B"), WAIT_S)
        assert [row.key for row in other] == [("B", "cls", 1)]
        assert entered == ["A", "B"]  # A's second request is still waiting for its turn
        held.set()
        await asyncio.wait_for(asyncio.gather(first, second), WAIT_S)
        assert entered == ["A", "B", "A"]

    try:
        asyncio.run(main())
    finally:
        held.set()
