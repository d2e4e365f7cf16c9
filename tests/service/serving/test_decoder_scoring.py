"""A decoder's reward models and classifiers through the service, on a tiny random Llama.

Jobs are created over HTTP and trained by a real ``JobRun`` on the app's own decoder; the
stored adapters are served by ``/reward/compare`` and ``/predict`` (the serving hook's
``DecoderScorer``) and by the in-process ``score`` best-of-n calls. Which base serves what does
not depend on the database, so these run on SQLite only; PostgreSQL's cross-replica
invalidation reaches the decoder's resident copies too.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from core.adapter import Adapter
from core.decoder.base import DecoderBase
from core.heads import HeadConfig
from core.methods import parse_method_config
from service.config import Settings
from service.db.models import AdapterRow
from service.errors import ErrorKind, ServiceError
from service.jobs import queue
from service.main import create_app
from service.serving.decoder_scoring import DecoderScorer
from service.serving.lifespan import serving
from service.state import app_state
from service.worker.job_run import JobRun, RunOutcome
from tests.core.decoder.helpers import random_decoder_lora
from tests.core.decoder.tiny_llama import TINY_LLAMA_NAME
from tests.service.helpers import (
    ADMIN_KEY,
    Headers,
    assert_compare_names_the_non_finite_text,
    assert_error,
    create_dataset,
    default_auth,
    served_decoder,
    store_adapter,
    tiny_bases_settings,
    wait_until,
)
from tests.tiny_bert import TINY_NAME

JOBS = "/v1/fine_tuning/jobs"
MAX_REQUEST_CHARS = 3000  # small, so that a test reaches it cheaply
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain"]
# As core's own decoder reward test (tests/core/decoder/test_heads.py), which ranks every
# held-out pair after these epochs.
LORA = {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1}}
HYPER = {"n_epochs": 10, "batch_size": 4, "learning_rate": 1e-2}
WINDOW = 64  # the stored random adapters' max_seq_length


def preference_rows(words: list[str]) -> list[dict[str, Any]]:
    """The preferred reply says the question's word back; the other refuses."""
    return [{"prompt": f"Say {w}.", "chosen": f"{w}!", "rejected": "No."} for w in words]


def temperature_rows(words: list[str]) -> list[dict[str, Any]]:
    return [{"text": f"{w} is warm", "label": "warm"} for w in words] + [
        {"text": f"{w} is cold", "label": "cold"} for w in words
    ]


@pytest.fixture
def both_settings(settings: Settings, tiny_model_dir: Path, tiny_llama_dir: Path) -> Settings:
    return tiny_bases_settings(
        settings,
        tiny_model_dir,
        tiny_llama_dir,
        TINY_NAME,
        TINY_LLAMA_NAME,
        max_request_chars=MAX_REQUEST_CHARS,
    )


@pytest.fixture
def both(both_settings: Settings) -> Iterator[TestClient]:
    """The app with its real serving hook on the tiny encoder and the tiny decoder."""
    with TestClient(create_app(both_settings, hooks=[serving])) as client:
        yield client


def _train(client: TestClient, settings: Settings, auth: Headers, **body: Any) -> dict[str, Any]:
    """Create a job over HTTP and run it to success with a real JobRun on the app's decoder."""
    resp = client.post(JOBS, json=body, headers=auth)
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["id"]
    factory: sessionmaker[Session] = app_state(client.app).sessionmaker
    with factory() as session:
        job = queue.claim_next_job(session, "w1", settings.lease_seconds)
        assert job is not None and job.id == job_id
        session.expunge(job)
    run = JobRun(
        job,
        factory=factory,
        base=served_decoder(client),
        settings=settings,
        worker_id="w1",
        shutdown=threading.Event(),
    )
    assert run.run() is RunOutcome.SUCCEEDED
    job_out: dict[str, Any] = client.get(f"{JOBS}/{job_id}", headers=auth).json()
    assert job_out["status"] == "succeeded", job_out["error"]
    return job_out


def _other_tenant(client: TestClient) -> Headers:
    resp = client.post("/v1/tenants", json={"name": "other"}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    return {"Authorization": f"Bearer {resp.json()['api_key']['key']}"}


def _key(client: TestClient, name: str) -> tuple[str, str, int]:
    """The adapter's serving key ``(tenant_id, name, version)``."""
    with app_state(client.app).sessionmaker() as session:
        row = session.scalar(select(AdapterRow).where(AdapterRow.name == name))
        assert row is not None
        return (row.tenant_id, row.name, row.version)


def _key_of(client: TestClient, auth: Headers, name: str) -> tuple[str, str, int]:
    """The serving key of the caller's adapter ``name``."""
    stored = client.get(f"/v1/adapters/{name}", headers=auth).json()
    with app_state(client.app).sessionmaker() as session:
        row = session.get(AdapterRow, stored["id"])
        assert row is not None
        return (row.tenant_id, row.name, row.version)


def _reward_adapter(
    decoder: DecoderBase,
    seed: int = 0,
    labels: list[str] | None = None,
    window: int = WINDOW,
    r: int = 2,
) -> Adapter:
    """A decoder reward model (a classifier with ``labels``) trained at ``window`` tokens:
    random LoRA of rank ``r`` on q_proj and a random head on the last token."""
    method = parse_method_config("lora", {"r": r, "target_modules": ["q_proj"]}, "decoder")
    gen = torch.Generator().manual_seed(seed)
    task = "reward" if labels is None else "classification"
    head = HeadConfig(
        task=task, label_names=labels or [], pooling="last_token", max_seq_length=window
    )
    adapter = random_decoder_lora(decoder, method, head, gen, scale=0.1)
    adapter.head_state = {
        "out.weight": torch.randn(head.out_features, decoder.config.hidden_size, generator=gen),
        "out.bias": torch.zeros(head.out_features),
    }
    return adapter


def _scorer(client: TestClient) -> DecoderScorer:
    scoring = app_state(client.app).decoder_scoring
    assert scoring is not None
    return scoring[TINY_LLAMA_NAME]


@pytest.mark.sqlite_only
def test_a_decoder_reward_model_trained_over_http_ranks_as_trained(
    both: TestClient, both_settings: Settings
) -> None:
    auth = default_auth(both_settings)
    train = create_dataset(both, auth, preference_rows(WORDS[:8]), kind="preference")
    val = create_dataset(both, auth, preference_rows(WORDS[8:]), kind="preference")
    job = _train(
        both,
        both_settings,
        auth,
        training_file=train,
        validation_file=val,
        model=TINY_LLAMA_NAME,
        method={**LORA, "hyperparameters": HYPER},
        suffix="rm",
        seed=3,
    )
    name = job["fine_tuned_model"]
    stored = both.get(f"/v1/adapters/{name}", headers=auth).json()
    assert (stored["task"], stored["base_model"]) == ("reward", TINY_LLAMA_NAME)
    assert job["metrics"]["val_accuracy"] == 1.0

    # Held-out pairs, batched in one request and one by one: the chosen reply wins each.
    pairs = [{"prompt": f"Say {w}.", "response_a": f"{w}!", "response_b": "No."} for w in WORDS[8:]]
    resp = both.post(f"/reward/compare?adapter={name}", json={"pairs": pairs}, headers=auth)
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["preferred"] for r in results] == ["a"] * 3
    assert all(r["reward_a"] > r["reward_b"] and r["p_a_preferred"] > 0.5 for r in results)
    one = both.post(f"/reward/compare?adapter={name}", json=pairs[0], headers=auth).json()
    assert one["preferred"] == "a" and one["reward_a"] == pytest.approx(results[0]["reward_a"])
    # /predict gives the same rewards for (prompt, response) pairs.
    inputs = [[p["prompt"], p["response_a"]] for p in pairs]
    predicted = both.post(f"/predict?adapter={name}", json={"inputs": inputs}, headers=auth)
    assert predicted.status_code == 200, predicted.text
    body = predicted.json()
    assert body["task"] == "reward"
    rewards = [p["reward"] for p in body["predictions"]]
    assert rewards == pytest.approx([r["reward_a"] for r in results], abs=1e-5)

    # The in-process API best-of-n calls: by the adapter's key, in the responses' order.
    scorer, key = _scorer(both), _key(both, name)
    assert key in scorer.engine.resident_keys()
    scores = asyncio.run(scorer.score(key, "Say rain.", ["No.", "rain!"]))
    assert len(scores) == 2 and scores[1] > scores[0]
    assert scores[1] == pytest.approx(results[-1]["reward_a"], abs=1e-5)

    # Bounds: the window with truncate=false, max_request_chars over all texts.
    url = f"/reward/compare?adapter={name}"
    long = {"prompt": "Say it.", "response_a": "word " * 400, "response_b": "No."}
    too_long = both.post(url, json={**long, "truncate": False}, headers=auth)
    assert_error(too_long, 422, code="input_too_long", param="response_a")
    assert both.post(url, json=long, headers=auth).status_code == 200  # cut as in training
    # Each text counts once, though a pair's prompt goes with both its responses: 5 x 602
    # characters in all (3 such pairs, 1,806, are served).
    huge = {"pairs": [{"prompt": "x" * 600, "response_a": "a", "response_b": "b"}] * 5}
    assert_error(both.post(url, json=huge, headers=auth), 413, code="request_too_large")
    fits = both.post(url, json={"pairs": huge["pairs"][:3]}, headers=auth)
    assert fits.status_code == 200, fits.text

    # Another tenant's adapter is not found, by either route.
    other = _other_tenant(both)
    for path, payload in [("/reward/compare", pairs[0]), ("/predict", {"inputs": ["hi"]})]:
        resp = both.post(f"{path}?adapter={name}", json=payload, headers=other)
        assert_error(resp, 404, param="adapter")

    # Deleted: the resident copy goes, later requests are 404s (the scorer's too).
    assert both.delete(f"/v1/adapters/{name}", headers=auth).status_code == 200
    assert_error(both.post(url, json=pairs[0], headers=auth), 404, param="adapter")
    with pytest.raises(ServiceError) as gone:
        asyncio.run(scorer.score(key, "Say rain.", ["rain!"]))
    assert gone.value.kind is ErrorKind.NOT_FOUND
    assert key not in scorer.engine.resident_keys()


@pytest.mark.sqlite_only
def test_a_decoder_classifier_predicts_labels_as_the_encoder_s_do(
    both: TestClient, both_settings: Settings
) -> None:
    auth = default_auth(both_settings)
    rows = create_dataset(both, auth, temperature_rows(WORDS), kind="classification")
    job = _train(
        both,
        both_settings,
        auth,
        training_file=rows,
        validation_file=rows,
        model=TINY_LLAMA_NAME,
        method={**LORA, "hyperparameters": {**HYPER, "n_epochs": 8}},
        suffix="temp",
        seed=3,
    )
    assert job["metrics"]["val_accuracy"] == 1.0
    name = job["fine_tuned_model"]
    inputs = ["moon is cold", "sun is warm", {"text": "rain is warm"}]
    resp = both.post(f"/predict?adapter={name}", json={"inputs": inputs}, headers=auth)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["adapter"], body["task"]) == (name, "classification")
    predictions = body["predictions"]
    assert [p["label"] for p in predictions] == ["cold", "warm", "warm"]
    for p in predictions:  # the encoder's shape: label, its probability, every label's
        assert set(p["probabilities"]) == {"cold", "warm"}
        assert sum(p["probabilities"].values()) == pytest.approx(1.0)
        assert p["score"] == p["probabilities"][p["label"]] > 0.5
    # A classifier is no reward model.
    pair = {"prompt": "p", "response_a": "a", "response_b": "b"}
    resp = both.post(f"/reward/compare?adapter={name}", json=pair, headers=auth)
    assert_error(resp, 422, code="adapter_task_mismatch")


@pytest.mark.sqlite_only
def test_one_tenant_s_flood_does_not_hold_up_another_s_scores(
    both: TestClient, both_settings: Settings
) -> None:
    """Tenant A queues many requests before tenant B sends one: B's is served within A's
    next batches (its queue is served in turn), not after A's whole flood."""
    auth, other = default_auth(both_settings), _other_tenant(both)
    decoder = served_decoder(both)
    store_adapter(both, auth, "rm", _reward_adapter(decoder, seed=1), base=decoder)
    store_adapter(both, other, "rm", _reward_adapter(decoder, seed=2), base=decoder)
    scorer = _scorer(both)
    key_a, key_b = _key_of(both, auth, "rm"), _key_of(both, other, "rm")
    responses = [f"reply number {i} " * 4 for i in range(16)]

    async def flood() -> list[str]:
        done: list[str] = []

        async def one(key: tuple[str, str, int], label: str) -> None:
            await scorer.score(key, "Say something.", responses)
            done.append(label)

        flood_a = [asyncio.ensure_future(one(key_a, f"a{i}")) for i in range(8)]
        await asyncio.sleep(0)  # A's requests are queued first
        await asyncio.gather(*flood_a, one(key_b, "b"))
        return done

    done = asyncio.run(flood())
    assert len(done) == 9
    # B's one request finished before most of A's: it did not wait behind A's queue.
    assert done.index("b") <= 4, done


@pytest.mark.sqlite_only
def test_a_decoder_reward_adapter_needs_its_decoder_not_the_encoder(
    both_settings: Settings,
) -> None:
    with TestClient(create_app(both_settings, hooks=[serving])) as client:
        decoder = served_decoder(client)
        store_adapter(
            client, default_auth(both_settings), "rm", _reward_adapter(decoder), base=decoder
        )
    encoder_only = both_settings.model_copy(update={"bases": [TINY_NAME]})
    with TestClient(create_app(encoder_only, hooks=[serving])) as client:
        auth = default_auth(encoder_only)
        pair = {"prompt": "p", "response_a": "a", "response_b": "b"}
        for path, body in [("/reward/compare", pair), ("/predict", {"inputs": ["hi"]})]:
            resp = client.post(f"{path}?adapter=rm", json=body, headers=auth)
            error = assert_error(resp, 422, param="adapter", code="base_model_mismatch")
            assert TINY_LLAMA_NAME in error["message"] and "does not load" in error["message"]
    # A decoder-only deployment serves it on the same routes (no encoder needed).
    decoder_only = both_settings.model_copy(update={"bases": [TINY_LLAMA_NAME]})
    with TestClient(create_app(decoder_only, hooks=[serving])) as client:
        resp = client.post(
            "/reward/compare?adapter=rm", json=pair, headers=default_auth(decoder_only)
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["preferred"] in ("a", "b")


@pytest.mark.postgres_only
def test_a_decoder_adapter_deleted_by_another_replica_leaves_the_scorer(
    both_settings: Settings,
) -> None:
    """The invalidation listener (PostgreSQL) drops a decoder head deleted elsewhere."""
    from service.db.session import make_db_engine, make_sessionmaker
    from service.serving.invalidation import invalidation
    from tests.service.serving.test_scale_out import WAIT_S

    with TestClient(create_app(both_settings, hooks=[serving, invalidation])) as client:
        auth = default_auth(both_settings)
        listener = app_state(client.app).invalidation_listener
        assert listener is not None and listener.connected.wait(WAIT_S)
        decoder = served_decoder(client)
        store_adapter(client, auth, "rm", _reward_adapter(decoder), base=decoder)
        pair = {"prompt": "p", "response_a": "a", "response_b": "b"}
        assert client.post("/reward/compare?adapter=rm", json=pair, headers=auth).status_code == 200
        scorer = _scorer(client)
        key = _key_of(client, auth, "rm")
        assert scorer.engine.resident_keys() == [key]

        # "Another replica" deletes it: a plain SQL delete on its own connection.
        other = make_db_engine(both_settings.db_url)
        with make_sessionmaker(other)() as session:
            session.execute(delete(AdapterRow).where(AdapterRow.name == "rm"))
            session.commit()
        other.dispose()
        assert wait_until(lambda: not scorer.engine.resident_keys(), WAIT_S)
        assert scorer.engine.bytes == 0
        resp = client.post("/reward/compare?adapter=rm", json=pair, headers=auth)
        assert_error(resp, 404, param="adapter")


def _set_cache(scorer: DecoderScorer, nbytes: int) -> None:
    """The engine's budget set to ``nbytes``, emptied, on the batcher's thread (its owner)."""
    engine = scorer.engine

    def empty() -> None:
        engine.max_resident_bytes = nbytes
        for key in engine.resident_keys():
            engine.unload(key)

    scorer.batcher.call_soon(empty)


@pytest.mark.sqlite_only
def test_a_decoder_head_larger_than_the_whole_cache_is_refused_for_good(
    both: TestClient, both_settings: Settings
) -> None:
    auth, decoder = default_auth(both_settings), served_decoder(both)
    store_adapter(both, auth, "rm", _reward_adapter(decoder), base=decoder)
    url, body = "/predict?adapter=rm", {"inputs": ["hi"]}
    alone = both.post(url, json=body, headers=auth)
    assert alone.status_code == 200, alone.text
    scorer = _scorer(both)
    nbytes = scorer.engine.bytes  # the one adapter's
    _set_cache(scorer, nbytes - 1)
    resp = both.post(url, json=body, headers=auth)
    error = assert_error(
        resp,
        409,
        code="adapter_too_large_for_cache",
        param="adapter",
        contains="LORAPLEX_ADAPTER_CACHE_MB",
    )
    assert f"needs {nbytes} bytes" in error["message"]
    assert "retry-after" not in resp.headers
    _set_cache(scorer, nbytes)  # it fits alone again: served
    again = both.post(url, json=body, headers=auth)
    assert again.status_code == 200, again.text
    assert again.json()["predictions"] == alone.json()["predictions"]


@pytest.mark.sqlite_only
def test_one_batch_of_more_decoder_heads_than_the_cache_holds_answers_every_request(
    both: TestClient, both_settings: Settings
) -> None:
    auth, decoder = default_auth(both_settings), served_decoder(both)
    names = ["rm0", "rm1", "rm2", "rm3"]
    for i, name in enumerate(names):  # one size: each charges the cache the same bytes
        store_adapter(both, auth, name, _reward_adapter(decoder, seed=i), base=decoder)

    def predict(name: str) -> httpx.Response:
        return both.post(f"/predict?adapter={name}", json={"inputs": ["hi"]}, headers=auth)

    alone = {name: predict(name).json()["predictions"] for name in names}
    scorer = _scorer(both)
    one = scorer.engine.bytes // len(names)
    _set_cache(scorer, 2 * one)  # room for two of the four
    gate = threading.Event()
    scorer.batcher.call_soon(lambda: gate.wait(60))  # the batcher waits: the four queue
    try:
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            pending = [pool.submit(predict, name) for name in names]
            assert wait_until(lambda: scorer.batcher.queued_rows == len(names), 60)
            gate.set()  # one batch of all four: two load, two wait for them to finish
            responses = [p.result() for p in pending]
    finally:
        gate.set()
    for name, resp in zip(names, responses, strict=True):
        assert resp.status_code == 200, resp.text
        got = resp.json()["predictions"][0]["reward"]
        assert got == pytest.approx(alone[name][0]["reward"], abs=1e-5)
    assert scorer.engine.evictions >= 2 and scorer.engine.bytes <= 2 * one


@pytest.mark.sqlite_only
def test_a_decoder_head_that_cannot_fit_beside_those_in_use_evicts_nothing(
    both: TestClient,
) -> None:
    from core.inference import Row
    from core.inference.residency import ResidencyBusyError
    from service.serving.decoder_scoring import DecoderHeadEngine

    decoder = served_decoder(both)
    adapters = {
        "in_use": _reward_adapter(decoder, seed=0),
        "idle": _reward_adapter(decoder, seed=1),
        "big": _reward_adapter(decoder, seed=2, r=16),
    }
    sizes = {}
    for key in adapters:
        alone = DecoderHeadEngine(decoder, max_resident_bytes=1 << 30)
        alone.plan([Row(key, "")], loader=adapters.__getitem__)
        sizes[key] = alone.bytes
    assert sizes["big"] >= sizes["in_use"] + sizes["idle"]
    # Room for the big one alone, or for the two small ones.
    engine = DecoderHeadEngine(decoder, max_resident_bytes=sizes["big"])
    held = engine.plan([Row("in_use", "")], loader=adapters.__getitem__)  # pinned until released
    engine.release(engine.plan([Row("idle", "")], loader=adapters.__getitem__))
    # Evicting "idle" leaves too little beside the pinned "in_use": it must stay resident.
    busy = engine.plan([Row("big", "")], loader=adapters.__getitem__)
    assert isinstance(busy.errors[0], ResidencyBusyError)
    assert engine.resident_keys() == ["in_use", "idle"] and engine.evictions == 0
    engine.release(held)
    engine.release(engine.plan([Row("big", "")], loader=adapters.__getitem__))
    assert engine.resident_keys() == ["big"] and engine.evictions == 2


def _huge_head(adapter: Adapter, weight: torch.Tensor) -> Adapter:
    """``adapter`` with head weights ``weight`` and no bias: finite, but the float32 output
    (largest 3.4e38) overflows where ``weight`` is large enough against the features."""
    head_state = {"out.weight": weight, "out.bias": torch.zeros(weight.shape[0])}
    return replace(adapter, head_state=head_state)


@pytest.mark.sqlite_only
@pytest.mark.parametrize("labels", [None, ["cold", "warm"]], ids=["reward", "classification"])
def test_a_decoder_head_s_non_finite_output_is_refused(
    both: TestClient, both_settings: Settings, labels: list[str] | None
) -> None:
    auth, decoder = default_auth(both_settings), served_decoder(both)
    adapter = _reward_adapter(decoder, labels=labels)
    huge = torch.full_like(adapter.head_state["out.weight"], 3e38)
    store_adapter(both, auth, "nan", _huge_head(adapter, huge), base=decoder)
    resp = both.post("/predict?adapter=nan", json={"inputs": ["x"]}, headers=auth)
    error = assert_error(resp, 409, param="inputs.0", code="non_finite_output")
    assert "'nan'" in error["message"] and "input 0 " in error["message"]


@pytest.mark.sqlite_only
def test_the_decoder_s_non_finite_error_names_the_input_that_overflows(
    both: TestClient, both_settings: Settings
) -> None:
    from core.decoder.scoring import encode_scored_turns, right_pad

    auth, decoder = default_auth(both_settings), served_decoder(both)
    adapter = _reward_adapter(decoder, seed=5)
    ok, bad = "x", "a longer sentence to score"
    # The head reads one feature j, which is small for ``ok`` and large for ``bad``: times
    # 3e38, only ``bad``'s reward overflows (no other feature adds to the sum).
    ids = encode_scored_turns(
        decoder.tokenizer, decoder.chat_template, [None, None], [ok, bad], WINDOW
    )
    with torch.inference_mode():
        feats = adapter.build_decoder_head(decoder).features(right_pad(ids, decoder.device))
    fits, overflows = feats[0].abs() < 0.5, feats[1].abs() > 2.0
    j = int(torch.nonzero(fits & overflows)[0])
    weight = torch.zeros(1, decoder.config.hidden_size)
    weight[0, j] = 3e38
    store_adapter(both, auth, "rm", _huge_head(adapter, weight), base=decoder)

    def post(path: str, body: dict[str, Any]) -> httpx.Response:
        return both.post(f"{path}?adapter=rm", json=body, headers=auth)

    assert_error(post("/predict", {"inputs": [ok, ok, bad]}), 409, param="inputs.2")
    assert_compare_names_the_non_finite_text(post, ok, bad)
    # Best-of-n's scores: the candidate is named, under the reward adapter's field.
    scorer = _scorer(both)
    with pytest.raises(ServiceError) as refused:
        asyncio.run(scorer.score(_key_of(both, auth, "rm"), None, [ok, bad]))
    assert (refused.value.code, refused.value.param) == ("non_finite_output", "reward_adapter")
    assert str(refused.value).startswith("candidate 1 gives adapter 'rm'")


@pytest.mark.sqlite_only
def test_a_decoder_input_too_long_names_its_pair_s_field(
    both: TestClient, both_settings: Settings
) -> None:
    auth, decoder = default_auth(both_settings), served_decoder(both)
    # The tiny Llama's chat template alone (its system prompt) is 90 tokens: a window of 160
    # holds it with a short text, not with a long one.
    window = 160
    store_adapter(both, auth, "rm", _reward_adapter(decoder, window=window), base=decoder)
    long = "word " * window

    def compare(body: dict[str, Any]) -> httpx.Response:
        body = {**body, "truncate": False}
        return both.post("/reward/compare?adapter=rm", json=body, headers=auth)

    short = {"response_a": "x", "response_b": "y"}
    resp = compare({"pairs": [short, {"response_a": "x", "response_b": long}]})
    error = assert_error(resp, 422, param="pairs.1.response_b", code="input_too_long")
    assert error["message"].startswith(f"pairs.1.response_b is longer than the {window} tokens")
    # A prompt too long for the window beside a response that fits is the prompt's fault.
    resp = compare({"pairs": [short, {"prompt": long, **short}]})
    error = assert_error(resp, 422, param="pairs.1.prompt", code="input_too_long")
    assert error["message"].startswith("pairs.1.prompt with response_a is longer")
    resp = compare({"prompt": "Say it.", "response_a": "No.", "response_b": long})
    assert_error(resp, 422, param="response_b", code="input_too_long")
    resp = both.post(
        "/predict?adapter=rm", json={"inputs": ["hi", long], "truncate": False}, headers=auth
    )
    error = assert_error(resp, 422, param="inputs.1", code="input_too_long")
    assert error["message"].startswith("input 1 is longer")
