"""Fixtures for the service tests: the app without ML hooks, on SQLite and on PostgreSQL.

Every test that uses the app (``settings``, ``client``, ``db``, ...) or ``migrated_db`` runs
twice, ``[sqlite]`` and ``[postgres]``: the same tests, not a copy. SQLite gets a fresh copy of
a migrated file per test; PostgreSQL one migrated database per session, emptied before each
test (TRUNCATE). Without a reachable PostgreSQL the ``[postgres]`` variants skip, saying so
(``LPX_REQUIRE_POSTGRES=1``, set by ``.ci/run``, turns that into a failure). Mark a test
``@pytest.mark.sqlite_only`` or ``@pytest.mark.postgres_only`` when it checks something only
one of them has (pragmas; LISTEN/NOTIFY): the other variant is deselected.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from service.config import DEFAULT_BASE_MODEL_NAME, Settings
from service.db.migrate import upgrade
from service.db.models import Base
from service.db.session import make_db_engine, make_sessionmaker
from service.main import create_app
from service.state import app_state
from tests.service.helpers import (
    ADMIN_KEY,
    Headers,
    scratch_postgres_database,
    tiny_bases_settings,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LORAPLEX_* from the developer's shell may leak into a test."""
    for name in list(os.environ):
        if name.startswith("LORAPLEX_"):
            monkeypatch.delenv(name)


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    # The encoder alone unless a test asks for more: loading the decoder too would slow every
    # start-up test for nothing.
    overrides.setdefault("bases", [overrides.get("base_model_name", DEFAULT_BASE_MODEL_NAME)])
    # Generation in float32 whatever the CPU: tests compare its tokens with transformers'.
    overrides.setdefault("generation_dtype", "float32")
    return Settings(_env_file=None, data_dir=data_dir, **overrides)  # type: ignore[call-arg]


DB_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only: runs only in the [sqlite] variant")
    config.addinivalue_line("markers", "postgres_only: runs only in the [postgres] variant")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the [postgres] variant of ``sqlite_only`` tests, and vice versa."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("db_backend") if callspec is not None else None
        unwanted = {"sqlite": "postgres_only", "postgres": "sqlite_only"}.get(backend or "")
        (dropped if unwanted and item.get_closest_marker(unwanted) else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated SQLite file, copied per test: start-up then only checks the revision."""
    path = tmp_path_factory.mktemp("template") / "loraplex.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One migrated PostgreSQL database for the session (emptied before each test)."""
    with scratch_postgres_database() as url:
        upgrade(url)
        yield url


def reset_postgres(url: str) -> None:
    """Empty every table, cheaply; first end connections a previous test left behind."""
    db_engine = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with db_engine.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            conn.execute(text("SET lock_timeout = '20s'"))
            tables = ", ".join(f'"{t}"' for t in Base.metadata.tables)
            conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    finally:
        db_engine.dispose()


@pytest.fixture(params=DB_BACKENDS)
def db_backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgres``: the parameter every database-backed test runs under."""
    backend: str = request.param
    return backend


@pytest.fixture
def database_url(
    db_backend: str, request: pytest.FixtureRequest, tmp_path: Path, migrated_template: Path
) -> str:
    """An empty, migrated database for this test."""
    if db_backend == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        reset_postgres(url)
        return url
    shutil.copyfile(migrated_template, tmp_path / "loraplex.db")
    return f"sqlite:///{tmp_path / 'loraplex.db'}"


@pytest.fixture
def settings(tmp_path: Path, db_backend: str, database_url: str) -> Settings:
    # SQLite: the default URL, derived from data_dir (where database_url put the file).
    url = database_url if db_backend == "postgres" else None
    return make_settings(tmp_path, admin_key=ADMIN_KEY, database_url=url)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    # hooks=[]: no base model, batcher or worker; start-up = migrations + bootstrap.
    with TestClient(create_app(settings, hooks=[])) as test_client:
        yield test_client


@pytest.fixture
def both(settings: Settings, tiny_model_dir: Path, tiny_llama_dir: Path) -> Iterator[TestClient]:
    """The app with its real serving hook on the tiny encoder and the tiny decoder, no worker
    (a test runs its jobs itself)."""
    from service.serving.lifespan import serving
    from tests.core.decoder.tiny_llama import TINY_LLAMA_NAME
    from tests.tiny_bert import TINY_NAME

    both = tiny_bases_settings(settings, tiny_model_dir, tiny_llama_dir, TINY_NAME, TINY_LLAMA_NAME)
    with TestClient(create_app(both, hooks=[serving])) as test_client:
        yield test_client


@pytest.fixture
def db(client: TestClient) -> sessionmaker[Session]:
    """The app's own session factory (the schema is migrated by then)."""
    factory: sessionmaker[Session] = app_state(client.app).sessionmaker
    return factory


@pytest.fixture
def migrated_db(database_url: str) -> Iterator[sessionmaker[Session]]:
    """A migrated database without any app (the queue tests run on both dialects)."""
    db_engine = make_db_engine(database_url)
    yield make_sessionmaker(db_engine)
    db_engine.dispose()


@pytest.fixture
def auth(client: TestClient, settings: Settings) -> Headers:
    """The default tenant's key, read from the file written at first start."""
    key = settings.default_key_path.read_text().strip()
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def admin() -> Headers:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def new_tenant(client: TestClient, admin: Headers) -> Callable[[str], Headers]:
    """Create a tenant through the admin API; returns its auth headers."""

    def create(name: str) -> Headers:
        resp = client.post("/v1/tenants", json={"name": name}, headers=admin)
        assert resp.status_code == 200, resp.text
        return {"Authorization": f"Bearer {resp.json()['api_key']['key']}"}

    return create


@pytest.fixture
def other_auth(new_tenant: Callable[[str], Headers]) -> Headers:
    return new_tenant("other")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the tiny random Llama (``tests.core.decoder.tiny_llama``), built once."""
    from tests.core.decoder.tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_serving_settings(settings: Settings, tiny_model_dir: Path) -> Settings:
    """The test settings, serving the tiny random base on one thread, without a worker."""
    from tests.tiny_bert import TINY_NAME

    return settings.model_copy(
        update={
            "base_model_path": tiny_model_dir,
            "base_model_name": TINY_NAME,
            "bases": [TINY_NAME],
            "embedded_worker": False,
            "torch_threads": 1,
        }
    )


@pytest.fixture
def serving_client(
    request: pytest.FixtureRequest, tiny_serving_settings: Settings
) -> Iterator[TestClient]:
    """The app with its serving hook on the tiny random base (no worker): /predict works.

    Parametrize it indirectly with a number of inference workers to run them (default 1).
    """
    from service.serving.lifespan import serving

    workers = getattr(request, "param", 1)
    settings = tiny_serving_settings.model_copy(update={"inference_workers": workers})
    with TestClient(create_app(settings, hooks=[serving])) as test_client:
        assert app_state(test_client.app).require_batcher().workers == workers
        yield test_client
