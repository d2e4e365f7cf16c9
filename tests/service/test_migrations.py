from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from service.db.migrate import current_revision, upgrade
from service.db.models import Base
from tests.service.helpers import scratch_postgres_database

EXPECTED_TABLES = {
    "tenants",
    "api_keys",
    "datasets",
    "jobs",
    "job_events",
    "checkpoints",
    "adapters",
}


def _check_schema(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            assert tables == EXPECTED_TABLES | {"alembic_version"}
            assert set(Base.metadata.tables) == EXPECTED_TABLES
            # The migration and the models describe the same schema, column for column.
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
            assert diff == []
    finally:
        engine.dispose()


def test_upgrade_creates_every_table_on_an_empty_sqlite_file(tmp_path: Path) -> None:
    db_file = tmp_path / "nested" / "fresh.db"  # the folder does not exist yet
    url = f"sqlite:///{db_file}"
    upgrade(url)
    assert db_file.is_file()
    _check_schema(url)
    assert current_revision(url) == "0001"
    upgrade(url)  # idempotent: start-up runs it every time
    assert current_revision(url) == "0001"


def test_every_user_table_has_tenant_id() -> None:
    for name, table in Base.metadata.tables.items():
        if name != "tenants":
            assert "tenant_id" in table.c, name


@pytest.mark.postgres
def test_upgrade_creates_every_table_on_an_empty_postgres() -> None:
    with scratch_postgres_database() as url:
        upgrade(url)
        _check_schema(url)
        upgrade(url)
        assert current_revision(url) == "0001"


def test_plain_postgresql_urls_use_psycopg3() -> None:
    from service.db.session import normalize_url

    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"
