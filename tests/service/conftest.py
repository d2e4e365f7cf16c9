"""Fixtures for the service tests: a real SQLite file per test, the app without ML hooks."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.migrate import upgrade
from service.db.models import Base
from service.db.session import make_engine, make_sessionmaker
from service.main import create_app
from tests.service.helpers import ADMIN_KEY, Headers, scratch_postgres_database


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LORAPLEX_* from the developer's shell may leak into a test."""
    for name in list(os.environ):
        if name.startswith("LORAPLEX_"):
            monkeypatch.delenv(name)


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    return Settings(_env_file=None, data_dir=data_dir, **overrides)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated SQLite file, copied per test: start-up then only checks the revision."""
    path = tmp_path_factory.mktemp("template") / "loraplex.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def settings(tmp_path: Path, migrated_template: Path) -> Settings:
    shutil.copyfile(migrated_template, tmp_path / "loraplex.db")
    return make_settings(tmp_path, admin_key=ADMIN_KEY)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    # hooks=[]: no base model, batcher or worker; start-up = migrations + bootstrap.
    with TestClient(create_app(settings, hooks=[])) as test_client:
        yield test_client


@pytest.fixture
def db(client: TestClient) -> sessionmaker[Session]:
    """The app's own session factory (the schema is migrated by then)."""
    factory: sessionmaker[Session] = client.app.state.sessionmaker  # type: ignore[attr-defined]
    return factory


@pytest.fixture(scope="session")
def postgres_queue_url() -> Iterator[str]:
    """One migrated PostgreSQL database shared by the session (tables emptied per test)."""
    with scratch_postgres_database() as url:
        upgrade(url)
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def migrated_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A migrated database without any app (the queue tests run on both dialects)."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_queue_url")
        engine = make_engine(url)
        with engine.begin() as conn:
            tables = ", ".join(Base.metadata.tables)
            conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    else:
        url = f"sqlite:///{tmp_path / 'queue.db'}"
        upgrade(url)
        engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


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


@pytest.fixture
def serving_client(settings: Settings, tiny_model_dir: Path) -> Iterator[TestClient]:
    """The app with its serving hook on the tiny random base (no worker): /predict works."""
    from service.serving.lifespan import serving
    from tests.tiny_bert import TINY_NAME

    tiny = settings.model_copy(
        update={
            "base_model_path": tiny_model_dir,
            "base_model_name": TINY_NAME,
            "embedded_worker": False,
            "torch_threads": 1,
        }
    )
    with TestClient(create_app(tiny, hooks=[serving])) as test_client:
        yield test_client
