"""The app factory: lifespan hooks, probes, OpenAPI, and the CLI."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.cli import main
from service.config import Settings
from service.db.migrate import current_revision, head_revision
from service.db.models import ApiKey, Tenant
from service.db.session import make_db_engine, make_sessionmaker
from service.main import LifespanHook, create_app
from service.serving.lifespan import serving
from service.state import AppState, app_state
from service.tenants.keys import hash_api_key
from tests.core.decoder.tiny_llama import TINY_LLAMA_NAME
from tests.service.helpers import (
    Headers,
    adapter_row,
    assert_error,
    tenant_id_by_name,
    tiny_bases_settings,
)
from tests.tiny_bert import TINY_NAME


def test_hooks_run_in_order_and_exit_in_reverse(settings: Settings) -> None:
    calls: list[str] = []

    def hook(name: str) -> LifespanHook:
        @asynccontextmanager
        async def run(state: AppState) -> AsyncIterator[None]:
            # Start-up has migrated and bootstrapped before any hook runs.
            assert current_revision(state.settings.db_url) == head_revision()
            calls.append(f"start {name}")
            yield
            calls.append(f"stop {name}")

        return run

    with TestClient(create_app(settings, hooks=[hook("model"), hook("worker")])):
        assert calls == ["start model", "start worker"]
    assert calls == ["start model", "start worker", "stop worker", "stop model"]


@pytest.mark.sqlite_only
def test_an_app_that_has_shut_down_holds_nothing_its_hooks_started(
    settings: Settings, tiny_model_dir: Path, tiny_llama_dir: Path
) -> None:
    """The serving hook lets go of what it started as it stops, while the app is still held
    (a test's client holds it; its own reference cycles wait for Python's collector): the
    generation scheduler with its KV cache (1 GiB by default) and the bases go at once, and
    once nothing holds the app it is freed too: FastAPI keeps every endpoint it inspects in a
    module-level cache, so a route closing over its app kept every test's app, ~1 GiB each,
    until the suite's end (~18 GB RSS)."""
    both = tiny_bases_settings(settings, tiny_model_dir, tiny_llama_dir, TINY_NAME, TINY_LLAMA_NAME)
    gc.disable()  # released means freed as the references go, not at a later collection
    try:
        with TestClient(create_app(both, hooks=[serving])) as client:
            state = app_state(client.app)
            assert state.generation is not None and state.bases is not None
            (server,) = state.generation.values()
            # The scheduler's owner thread and the encoder batcher's threads.
            hook_threads = [
                t for t in threading.enumerate() if t.name.startswith(("generation:", "inference"))
            ]
            assert {f"generation:{TINY_LLAMA_NAME}", "inference"} <= {t.name for t in hook_threads}
            released = [
                weakref.ref(server.scheduler),
                weakref.ref(server.scheduler.cache.keys[0]),
                weakref.ref(state.bases[TINY_LLAMA_NAME]),
                weakref.ref(state.bases[TINY_NAME]),
            ]
            del server
        assert [t.name for t in hook_threads if t.is_alive()] == []
        assert (state.generation, state.decoder_scoring, state.bases, state.batcher) == (None,) * 4
        assert [ref() for ref in released] == [None] * len(released)
    finally:
        gc.enable()
    app = weakref.ref(client.app)
    del client, state
    gc.collect()
    assert app() is None


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    # Probes by HEAD answer as GET does, without a body (they were 405s).
    for path in ("/healthz", "/readyz"):
        head = client.head(path)
        assert (head.status_code, head.content) == (client.get(path).status_code, b"")
    assert client.get("/readyz").json() == {"status": "ready", "checks": {"database": "ok"}}


def test_readyz_is_503_until_expected_parts_are_ready(client: TestClient) -> None:
    readiness = app_state(client.app).readiness
    readiness.expect("model", "loading weights")
    resp = client.get("/readyz")
    assert_error(resp, 503, code="not_ready", contains="model")
    assert resp.json()["checks"] == {"database": "ok", "model": "loading weights"}
    readiness.ready("model")
    assert client.get("/readyz").json()["checks"] == {"database": "ok", "model": "ok"}


def test_inference_without_the_serving_hook_asks_to_retry(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    """The state has no batcher until the serving hook sets it (never, with ``hooks=[]``): a
    request for an adapter that exists is told to retry, not answered with a 500."""
    with db() as session:
        session.add(adapter_row(tenant_id_by_name(db), "clf"))
        session.commit()
    for truncate in (True, False):  # with and without the length check, which needs the model
        body = {"inputs": ["fine"], "truncate": truncate}
        resp = client.post("/predict?adapter=clf", json=body, headers=auth)
        assert_error(resp, 503, code="model_not_ready")
        assert resp.headers["Retry-After"] == "5"


def test_a_stored_adapter_this_server_cannot_load_is_named_not_a_500(
    serving_client: TestClient, auth: Headers
) -> None:
    """A stored head config this release refuses (here: no task) is read on the request path
    without validating it, and loading it answers 409 naming the adapter."""
    state = app_state(serving_client.app)
    base = state.require_base_model()
    db = state.sessionmaker
    with db() as session:
        row = adapter_row(
            tenant_id_by_name(db), "old", base_model=base.name, base_fingerprint=base.fingerprint
        )
        session.add(row)
        session.commit()
    resp = serving_client.post("/predict?adapter=old", json={"inputs": ["fine"]}, headers=auth)
    assert_error(resp, 409, param="adapter", code="adapter_unreadable")
    assert "'old'" in resp.json()["error"]["message"]


def test_app_state_is_only_on_apps_create_app_built() -> None:
    with pytest.raises(TypeError, match="create_app"):
        app_state(FastAPI())


def test_openapi_documents_every_resource(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    for path in (
        "/v1/datasets",
        "/v1/datasets/{dataset_id}",
        "/v1/fine_tuning/jobs",
        "/v1/fine_tuning/jobs/{job_id}/events",
        "/v1/fine_tuning/jobs/{job_id}/checkpoints",
        "/v1/fine_tuning/jobs/{job_id}/cancel",
        "/v1/adapters/{name}",
        "/v1/tenants/{tenant_id}/keys/{key_id}",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    upload = spec["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    assert set(upload) == {"multipart/form-data", "application/json"}
    assert client.get("/docs").status_code == 200


def test_cli_migrate_and_create_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["migrate", "--url", url]) == 0
    assert head_revision() in capsys.readouterr().out

    assert main(["admin", "create-key", "--tenant", "acme", "--admin", "--url", url]) == 0
    out = capsys.readouterr()
    secret = out.out.strip()
    assert secret.startswith("lpx_") and "created tenant 'acme'" in out.err

    db_engine = make_db_engine(url)
    with make_sessionmaker(db_engine)() as session:
        key = session.scalars(select(ApiKey)).one()
        assert key.key_hash == hash_api_key(secret) and key.is_admin
        assert session.scalars(select(Tenant.name)).all() == ["acme"]
    db_engine.dispose()


def test_cli_worker_parses_its_flags() -> None:
    # Not run here: ``loraplex worker`` loads the model and polls until signalled (the e2e
    # fault tests run real worker processes).
    from service.cli import build_parser, cmd_worker

    args = build_parser().parse_args(["worker", "--worker-id", "w1"])
    assert args.func is cmd_worker and args.worker_id == "w1"
