"""Helpers shared by the service tests (request builders and the error-shape assertion)."""

from __future__ import annotations

import io
import json
import os
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from tests.ci import IN_CI
from tests.postgres import DEFAULT_ADMIN_URL, scratch_database

if TYPE_CHECKING:
    from pathlib import Path

    from core.base import FrozenBase
    from core.decoder.base import DecoderBase
    from core.generation.scheduler import Scheduler
    from core.training.trainer import ProgressEvent
    from service.config import Settings
    from service.worker.job_run import JobRun

ADMIN_KEY = "test-admin-key-0123456789"

Headers = dict[str, str]

# Not LORAPLEX_*: those are cleared for every test.
POSTGRES_ADMIN_URL = os.environ.get("LPX_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL)


# In CI (.ci/run sets LPX_REQUIRE_POSTGRES=1; CI=true too) a missing PostgreSQL is a failure,
# not a skip.
REQUIRE_POSTGRES = os.environ.get("LPX_REQUIRE_POSTGRES", "") not in ("", "0") or IN_CI


@contextmanager
def scratch_postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for the duration; skips if the server is down."""
    db_engine = create_engine(
        POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    try:
        with db_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        db_engine.dispose()
        reason = f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({type(exc).__name__})"
        if REQUIRE_POSTGRES:
            pytest.fail(f"{reason}, and LPX_REQUIRE_POSTGRES is set")
        pytest.skip(f"{reason}; set LPX_TEST_POSTGRES_URL to run the PostgreSQL tests")
    db_engine.dispose()
    with scratch_database(POSTGRES_ADMIN_URL, prefix="loraplex_test") as url:
        yield url


def assert_error(
    resp: httpx.Response,
    status: int,
    *,
    code: str | None = None,
    param: str | None = None,
    type: str | None = None,
    contains: str | None = None,
) -> dict[str, Any]:
    """Check the status and that the body is exactly the standard error shape."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) >= {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    if type is not None:
        assert error["type"] == type, error
    if contains is not None:
        assert contains in error["message"], error
    return error


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


CLASSIFICATION_ROWS = [
    {"text": "a wonderful film", "label": "pos"},
    {"text": "dull and slow", "label": "neg"},
    {"text": "loved every minute", "label": "pos"},
    {"text": "a waste of time", "label": "neg"},
]


def upload(
    client: TestClient,
    headers: Headers,
    data: bytes,
    *,
    kind: str = "classification",
    filename: str = "train.jsonl",
    content_type: str = "application/octet-stream",
    name: str | None = None,
) -> httpx.Response:
    form = {"kind": kind} | ({"name": name} if name else {})
    return client.post(
        "/v1/datasets", headers=headers, data=form, files={"file": (filename, data, content_type)}
    )


def create_dataset(
    client: TestClient,
    headers: Headers,
    rows: list[dict[str, Any]] | None = None,
    *,
    kind: str = "classification",
) -> str:
    resp = upload(client, headers, jsonl(rows or CLASSIFICATION_ROWS), kind=kind)
    assert resp.status_code == 200, resp.text
    dataset_id: str = resp.json()["id"]
    return dataset_id


def job_body(training_file: str, **extra: Any) -> dict[str, Any]:
    return {
        "training_file": training_file,
        "method": {"type": "lora", "lora": {"r": 8}, "hyperparameters": {"n_epochs": 1}},
        **extra,
    }


def adapter_row(tenant_id: str, name: str, **extra: Any) -> Any:
    """An unsaved AdapterRow with plausible metadata and fake weights.

    Pass ``version=None`` (and ``name=""``) to let ``finish_success`` fill them in.
    """
    from service.db.models import AdapterRow

    values: dict[str, Any] = {
        "tenant_id": tenant_id,
        "name": name,
        "version": 1,
        "method": "lora",
        "task": "classification",
        # The shape core.adapter.Adapter.config_dict() stores: the serving path reads it.
        "config": {"method": {"type": "lora", "r": 8, "alpha": 16}, "head": {}},
        "weights": b"\x00" * 64,
        "label_names": ["neg", "pos"],
        "metrics": {"accuracy": 0.9},
        "trainable_params": 1234,
        "trainable_pct": 0.5,
        "size_bytes": 64,
        "base_model": "tiny",
        "base_fingerprint": "sha256:abc",
    }
    values.update(extra)
    return AdapterRow(**values)


def store_adapter(
    client: TestClient, headers: Headers, name: str, adapter: Any, base: Any = None
) -> Any:
    """Insert a core ``Adapter`` for the tenant of ``headers``, as a finished job would, on
    ``base`` (default: the app's encoder)."""
    from service.adapters.records import next_adapter_version
    from service.adapters.store import adapter_row_from
    from service.db.models import ApiKey
    from service.state import app_state
    from service.tenants.keys import hash_api_key

    state = app_state(client.app)
    key = headers["Authorization"].removeprefix("Bearer ")
    with state.sessionmaker() as session:
        tenant_id = session.query(ApiKey).filter_by(key_hash=hash_api_key(key)).one().tenant_id
        row = adapter_row_from(adapter, base or state.require_base_model(), name=name)
        row.tenant_id = tenant_id
        row.version = next_adapter_version(session, tenant_id)
        session.add(row)
        session.commit()
        return row.version


# A request-size limit small enough to reach in a test (serving's `small_client`).
SMALL_REQUEST_CHARS = 4000


def default_auth(settings: Settings) -> Headers:
    """The default tenant's key, read from the file the app wrote at its first start."""
    return {"Authorization": f"Bearer {settings.default_key_path.read_text().strip()}"}


def served_decoder(client: TestClient) -> DecoderBase:
    """The decoder base the app's serving hook loaded."""
    from service.state import app_state

    decoder = app_state(client.app).require_bases().decoder
    assert decoder is not None
    return decoder


def tiny_bases_settings(
    settings: Settings, tiny_model_dir: Path, llama: Path, *names: str, **extra: Any
) -> Settings:
    """``settings`` with the tiny encoder and the tiny decoder configured, ``names`` loaded,
    no worker, one torch thread; ``extra`` overrides any other field."""
    from tests.core.decoder.tiny_llama import TINY_LLAMA_NAME
    from tests.tiny_bert import TINY_NAME

    return settings.model_copy(
        update={
            "base_model_path": tiny_model_dir,
            "base_model_name": TINY_NAME,
            "decoder_model_path": llama,
            "decoder_model_name": TINY_LLAMA_NAME,
            "bases": list(names),
            "embedded_worker": False,
            "torch_threads": 1,
            **extra,
        }
    )


def json_post_scope(
    path: str, body: bytes, authorization: str, query: bytes = b""
) -> dict[str, Any]:
    """The ASGI scope of a JSON POST of ``body`` to ``path``: for tests that call the app
    themselves, to play a client that leaves at a chosen moment."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [
            (b"authorization", authorization.encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    """Whether ``condition`` held within ``timeout_s`` (polled every 10 ms)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@contextmanager
def uvicorn_serving(app: Any, timeout_s: float = 30.0) -> Iterator[int]:
    """A real uvicorn server on ``app`` whose lifespan a test client already ran, on a free
    loopback port (yielded), in a thread."""
    import uvicorn

    from tests.e2e.server import free_port

    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), lifespan="off", log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout_s), "uvicorn did not start"
        yield config.port
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)


def wait_until_idle(scheduler: Scheduler, timeout_s: float = 30.0) -> None:
    """Wait, at most ``timeout_s``, until ``scheduler`` runs no sequence: a cancelled one is
    dropped at its next step. The caller asserts what must hold then."""
    wait_until(lambda: not scheduler.running, timeout_s)


def serve_base(*bases: Any) -> Any:
    """A lifespan hook that puts already loaded bases on the app (``core.base.FrozenBase``
    encoders, ``core.decoder.base.DecoderBase`` decoders), as the serving hook does (without
    its inference thread): for routes that need a base but not the batcher (adapter
    import/export, /v1/models)."""
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    from core.base import FrozenBase
    from service.bases import BaseKind, Bases, BaseSpec
    from service.state import AppState

    def spec(base: Any) -> BaseSpec:
        kind: BaseKind = "encoder" if isinstance(base, FrozenBase) else "decoder"
        return BaseSpec(base.name, kind, base.path)

    loaded = {base.name: (spec(base), base) for base in bases}

    @asynccontextmanager
    async def hook(state: AppState) -> AsyncIterator[None]:
        state.readiness.expect("model")
        state.bases = Bases(loaded)
        state.base_model = state.bases.encoder
        state.readiness.ready("model")
        yield

    return hook


# --- rows straight into the database (no app) ---------------------------------------------------


def sqlite_db_bytes(db: sessionmaker[Session]) -> int:
    """The SQLite database's size in pages, as bytes: what its file shrinks to at checkpoint."""
    with db() as session:
        pages = session.execute(text("PRAGMA page_count")).scalar_one()
        return int(pages) * int(session.execute(text("PRAGMA page_size")).scalar_one())


def add_tenant(db: sessionmaker[Session], name: str = "t") -> str:
    from service.db.models import Tenant

    with db() as session:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.commit()
        return tenant.id


def tenant_id_by_name(db: sessionmaker[Session], name: str = "default") -> str:
    from service.db.models import Tenant

    with db() as session:
        return session.scalars(select(Tenant.id).where(Tenant.name == name)).one()


def add_queued_job(
    db: sessionmaker[Session], tenant_id: str, name: str = "ad", model: str = "tiny", **extra: Any
) -> str:
    """A queued LoRA job row whose files need not exist (queue and lease tests)."""
    from service.db.models import Job, JobStatus

    with db() as session:
        job = Job(
            tenant_id=tenant_id,
            status=JobStatus.QUEUED,
            model=model,
            method={"type": "lora", "lora": {}},
            hyperparameters={},
            training_file="file-x",
            adapter_name=name,
            seed=1,
            **extra,
        )
        session.add(job)
        session.commit()
        return job.id


def zip_bytes(files: dict[str, bytes]) -> bytes:
    """A deflated zip archive of ``files`` (name → bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def shutdown_at_step(step: int) -> type[JobRun]:
    """A ``JobRun`` whose worker is told to stop (SIGTERM) while ``step`` is reported."""
    from service.worker.job_run import JobRun

    class ShutdownAtStep(JobRun):
        def _on_progress(self, ev: ProgressEvent) -> None:
            super()._on_progress(ev)
            if ev.step == step:
                self.shutdown.set()

    return ShutdownAtStep


def claimed_run(
    db: sessionmaker[Session],
    settings: Settings,
    base: FrozenBase,
    cls: type[JobRun] | None = None,
) -> JobRun:
    """Claim the oldest queued job as the worker loop does: a ``JobRun`` (or ``cls``) of it on
    ``base``, as worker "w1", ready to ``run()`` in this process."""
    from service.jobs import queue
    from service.worker.job_run import JobRun

    with db() as session:
        job = queue.claim_next_job(session, "w1", settings.lease_seconds)
        assert job is not None
        session.expunge(job)
    return (cls or JobRun)(
        job, factory=db, base=base, settings=settings, worker_id="w1", shutdown=threading.Event()
    )


def assert_compare_names_the_non_finite_text(
    post: Callable[[str, dict[str, Any]], httpx.Response], ok: str, bad: str
) -> None:
    """``/reward/compare`` on the adapter ``rm`` (``post(path, body)``), whose output is
    finite for ``ok`` and not for ``bad``: 409 ``non_finite_output`` naming the text's field,
    in either form, and 200 where every text is fine."""
    pairs = [{"response_a": ok, "response_b": ok}, {"response_a": ok, "response_b": bad}]
    resp = post("/reward/compare", {"pairs": pairs})
    error = assert_error(resp, 409, param="pairs.1.response_b", code="non_finite_output")
    assert error["message"].startswith("pairs.1.response_b gives adapter 'rm' an output")
    resp = post("/reward/compare", {"response_a": bad, "response_b": ok})
    assert_error(resp, 409, param="response_a", code="non_finite_output")
    fine = post("/reward/compare", {"response_a": ok, "response_b": ok})
    assert fine.status_code == 200, fine.text
