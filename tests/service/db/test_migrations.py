from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, create_engine, inspect, text

from service.db.migrate import alembic_config, current_revision, head_revision, upgrade
from service.db.models import Base
from tests.service.helpers import scratch_postgres_database

REPO = Path(__file__).resolve().parents[3]

EXPECTED_TABLES = {
    "tenants",
    "api_keys",
    "datasets",
    "jobs",
    "job_events",
    "checkpoints",
    "adapters",
    "worker_heartbeats",
}
# Operational tables: about processes, not any tenant's data.
NON_TENANT_TABLES = {"tenants", "worker_heartbeats"}


@contextmanager
def _connection(url: str, *, write: bool = False) -> Iterator[Connection]:
    """A connection to ``url`` (in a committed transaction with ``write``), its engine disposed
    afterwards: a test's upgrades and downgrades run on engines of their own."""
    db_engine = create_engine(url)
    try:
        with db_engine.begin() if write else db_engine.connect() as conn:
            yield conn
    finally:
        db_engine.dispose()


def _check_schema(url: str) -> None:
    with _connection(url) as conn:
        tables = set(inspect(conn).get_table_names())
        assert tables == EXPECTED_TABLES | {"alembic_version"}
        assert set(Base.metadata.tables) == EXPECTED_TABLES
        # The migration and the models describe the same schema, column for column.
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
        assert diff == []


def test_upgrade_creates_every_table_on_an_empty_sqlite_file(tmp_path: Path) -> None:
    db_file = tmp_path / "nested" / "fresh.db"  # the folder does not exist yet
    url = f"sqlite:///{db_file}"
    upgrade(url)
    assert db_file.is_file()
    _check_schema(url)
    assert current_revision(url) == head_revision()
    upgrade(url)  # idempotent: start-up runs it every time
    assert current_revision(url) == head_revision()


def test_every_user_table_has_tenant_id() -> None:
    for name, table in Base.metadata.tables.items():
        if name not in NON_TENANT_TABLES:
            assert "tenant_id" in table.c, name


@pytest.mark.postgres
def test_upgrade_creates_every_table_on_an_empty_postgres() -> None:
    with scratch_postgres_database() as url:
        upgrade(url)
        _check_schema(url)
        upgrade(url)
        assert current_revision(url) == head_revision()


def test_plain_postgresql_urls_use_psycopg3() -> None:
    from service.db.session import normalize_url

    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


def _insert_adapter(url: str, weights: bytes) -> None:
    from service.db.models import Tenant
    from service.db.session import make_db_engine, make_sessionmaker
    from tests.service.helpers import adapter_row

    db_engine = make_db_engine(url)
    try:
        with make_sessionmaker(db_engine)() as session:
            tenant = Tenant(name="t")
            session.add(tenant)
            session.flush()
            session.add(adapter_row(tenant.id, "kept", weights=weights, size_bytes=len(weights)))
            session.commit()
    finally:
        db_engine.dispose()


@pytest.mark.postgres
def test_postgres_upgrade_from_the_first_revision_keeps_data_and_binary_columns() -> None:
    # 3 MB holding every byte value: bytea must round-trip it exactly (no text encoding).
    weights = bytes(range(256)) * (3 * 4096)
    with scratch_postgres_database() as url:
        upgrade(url, "0001")
        _insert_adapter(url, weights)
        upgrade(url)
        assert current_revision(url) == head_revision()
        _check_schema(url)
        with _connection(url) as conn:
            cols = {
                (t, c["name"]): str(c["type"]).upper()
                for t in ("adapters", "checkpoints", "datasets")
                for c in inspect(conn).get_columns(t)
            }
            stored = conn.execute(text("SELECT weights FROM adapters")).scalar_one()
            storage = dict(
                conn.execute(
                    text(
                        "SELECT attname, attstorage FROM pg_attribute WHERE attnum > 0 AND "
                        "(attrelid, attname) IN (('adapters'::regclass, 'weights'), "
                        "('checkpoints'::regclass, 'state'), ('datasets'::regclass, 'rows'))"
                    )
                ).all()
            )
        assert cols[("adapters", "weights")] == "BYTEA"
        assert cols[("checkpoints", "state")] == "BYTEA"
        assert cols[("datasets", "rows")] == "BYTEA"
        assert bytes(stored) == weights
        # Out of line and uncompressed: tensors and gzip do not shrink under TOAST compression.
        assert storage == {"weights": "e", "state": "e", "rows": "e"}
        # Down to 0001 and up again, data kept.
        command.downgrade(alembic_config(url), "0001")
        assert current_revision(url) == "0001"
        upgrade(url)
        assert current_revision(url) == head_revision()
        with _connection(url) as conn:
            again = conn.execute(text("SELECT weights FROM adapters")).scalar_one()
        assert bytes(again) == weights


def test_sqlite_binary_columns_are_blobs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'blob.db'}"
    upgrade(url)
    weights = bytes(range(256)) * 4096
    _insert_adapter(url, weights)
    with _connection(url) as conn:
        col = {c["name"]: c for c in inspect(conn).get_columns("adapters")}["weights"]
        stored = conn.execute(text("SELECT weights FROM adapters")).scalar_one()
    assert str(col["type"]).upper() == "BLOB"
    assert stored == weights


@pytest.mark.postgres
def test_concurrent_upgrades_of_an_empty_postgres_all_succeed() -> None:
    """Replicas and workers all migrate at start; the advisory lock serialises them."""
    code = "import sys; from service.db.migrate import upgrade; upgrade(sys.argv[1])"
    with scratch_postgres_database() as url:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, url],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for _ in range(4)
        ]
        outputs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
        assert current_revision(url) == head_revision()
        _check_schema(url)


def _insert_dataset(url: str, kind: str) -> None:
    with _connection(url, write=True) as conn:
        conn.execute(
            text(
                "INSERT INTO datasets (id, tenant_id, name, kind, rows, rows_encoding, "
                "row_count, bytes, sha256, created_at) VALUES (:id, 't1', 'd', :kind, :rows, "
                "'jsonl+gzip', 1, 1, 'x', CURRENT_TIMESTAMP)"
            ),
            {"id": f"file-{kind}", "kind": kind, "rows": b"\x00"},
        )


def _insert_tenant(url: str) -> None:
    with _connection(url, write=True) as conn:
        conn.execute(
            text("INSERT INTO tenants (id, name, created_at) VALUES ('t1', 't', CURRENT_TIMESTAMP)")
        )


def _kind_constraint_holds(url: str) -> None:
    """0007 widens datasets.kind to chat and dpo, and still refuses unknown kinds."""
    from sqlalchemy.exc import IntegrityError

    upgrade(url, "0006")
    _insert_tenant(url)
    _insert_dataset(url, "preference")
    with pytest.raises(IntegrityError):
        _insert_dataset(url, "chat")
    upgrade(url)
    _check_schema(url)
    _insert_dataset(url, "chat")
    _insert_dataset(url, "dpo")
    with pytest.raises(IntegrityError):
        _insert_dataset(url, "images")


def test_sqlite_dataset_kinds_chat_and_dpo(tmp_path: Path) -> None:
    _kind_constraint_holds(f"sqlite:///{tmp_path / 'kinds.db'}")


@pytest.mark.postgres
def test_postgres_dataset_kinds_chat_and_dpo() -> None:
    with scratch_postgres_database() as url:
        _kind_constraint_holds(url)


def _downgrade_refused_while_chat_or_dpo_datasets_exist(url: str) -> None:
    """0007's downgrade refuses, naming the datasets, before touching the schema (SQLite's
    batch copy is not transactional); once they are deleted it goes through."""
    from alembic.util import CommandError

    # At 0007 itself: from a later head, SQLite would keep the later downgrades that ran
    # before 0007's refused (PostgreSQL rolls them back), and the test is about 0007's.
    upgrade(url, "0007")
    _insert_tenant(url)
    _insert_dataset(url, "preference")
    _insert_dataset(url, "chat")
    _insert_dataset(url, "dpo")
    for _ in range(2):  # a refusal leaves nothing behind that would change the next answer
        with pytest.raises(CommandError, match=r"2 dataset\(s\).*file-chat.*file-dpo"):
            command.downgrade(alembic_config(url), "0006")
        assert current_revision(url) == "0007"
        with _connection(url) as conn:
            # No _alembic_tmp_datasets left behind.
            assert set(inspect(conn).get_table_names()) == EXPECTED_TABLES | {"alembic_version"}
            assert conn.execute(text("SELECT count(*) FROM datasets")).scalar_one() == 3
    with _connection(url, write=True) as conn:
        conn.execute(text("DELETE FROM datasets WHERE kind IN ('chat', 'dpo')"))
    command.downgrade(alembic_config(url), "0006")
    assert current_revision(url) == "0006"
    with _connection(url) as conn:
        assert set(inspect(conn).get_table_names()) == EXPECTED_TABLES | {"alembic_version"}
        assert conn.execute(text("SELECT id FROM datasets")).scalars().all() == ["file-preference"]


def test_sqlite_downgrade_refused_while_chat_or_dpo_datasets_exist(tmp_path: Path) -> None:
    _downgrade_refused_while_chat_or_dpo_datasets_exist(f"sqlite:///{tmp_path / 'down.db'}")


@pytest.mark.postgres
def test_postgres_downgrade_refused_while_chat_or_dpo_datasets_exist() -> None:
    with scratch_postgres_database() as url:
        _downgrade_refused_while_chat_or_dpo_datasets_exist(url)


_JOB_COLUMNS_0008 = {"openai_method", "reference_adapter_name"}


def _job_columns(url: str) -> set[str]:
    with _connection(url) as conn:
        return {c["name"] for c in inspect(conn).get_columns("jobs")}


def _insert_job(url: str) -> None:
    """A queued LoRA job ``ftjob-old`` of tenant ``t1``."""
    with _connection(url, write=True) as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, tenant_id, status, model, method, hyperparameters, "
                "training_file, adapter_name, seed, created_at) VALUES ('ftjob-old', 't1', "
                "'queued', 'm', :method, '{}', 'file-x', 'a', 1, CURRENT_TIMESTAMP)"
            ),
            {"method": '{"type": "lora", "lora": {}}'},
        )


def _job_echo_columns_up_and_down(url: str) -> None:
    """0008 adds the job's OpenAI method type and reference adapter name, null on the jobs
    already there; its downgrade drops them and keeps the jobs."""
    upgrade(url, "0007")
    _insert_tenant(url)
    _insert_job(url)
    assert not _JOB_COLUMNS_0008 & _job_columns(url)
    upgrade(url)
    assert current_revision(url) == head_revision()
    _check_schema(url)
    with _connection(url, write=True) as conn:
        old = conn.execute(
            text("SELECT openai_method, reference_adapter_name FROM jobs WHERE id = 'ftjob-old'")
        ).one()
        assert tuple(old) == (None, None)
        conn.execute(
            text(
                "UPDATE jobs SET openai_method = 'dpo', reference_adapter_name = 'sft' "
                "WHERE id = 'ftjob-old'"
            )
        )
    command.downgrade(alembic_config(url), "0007")
    assert current_revision(url) == "0007"
    assert not _JOB_COLUMNS_0008 & _job_columns(url)
    with _connection(url) as conn:
        assert set(inspect(conn).get_table_names()) == EXPECTED_TABLES | {"alembic_version"}
        assert conn.execute(text("SELECT id FROM jobs")).scalars().all() == ["ftjob-old"]
    upgrade(url)
    _check_schema(url)


def test_sqlite_job_echo_columns_up_and_down(tmp_path: Path) -> None:
    _job_echo_columns_up_and_down(f"sqlite:///{tmp_path / 'echo.db'}")


@pytest.mark.postgres
def test_postgres_job_echo_columns_up_and_down() -> None:
    with scratch_postgres_database() as url:
        _job_echo_columns_up_and_down(url)


def _insert_event(url: str, level: str, type_: str, message: str) -> None:
    with _connection(url, write=True) as conn:
        conn.execute(
            text(
                "INSERT INTO job_events (job_id, tenant_id, created_at, level, message, type) "
                "VALUES ('ftjob-old', 't1', CURRENT_TIMESTAMP, :level, :message, :type)"
            ),
            {"level": level, "message": message, "type": type_},
        )


def _event_values(url: str) -> list[tuple[str, str, str]]:
    with _connection(url) as conn:
        rows = conn.execute(text("SELECT message, level, type FROM job_events ORDER BY id"))
        return [tuple(row) for row in rows]


def _event_values_up_and_down(url: str) -> None:
    """0009 rewrites the events stored with values OpenAI's event type refuses: level
    "warning" becomes "warn", a checkpoint's type "checkpoint" becomes "message" (its data
    kept) and its text OpenAI's "created"; its downgrade gives them back."""
    upgrade(url, "0008")
    _insert_tenant(url)
    _insert_job(url)
    before = [
        ("Job requeued: worker shutting down", "warning", "message"),
        ("Checkpoint saved at step 4", "info", "checkpoint"),
        ("Step 4/8: training loss=0.5", "info", "metrics"),
        ("Job failed: x", "error", "message"),
        ("Checkpoint at step 4 unusable (x); starting over", "warning", "message"),
    ]
    for message, level, type_ in before:
        _insert_event(url, level, type_, message)
    upgrade(url)
    assert current_revision(url) == head_revision()
    _check_schema(url)
    assert _event_values(url) == [
        ("Job requeued: worker shutting down", "warn", "message"),
        ("Checkpoint created at step 4", "info", "message"),
        ("Step 4/8: training loss=0.5", "info", "metrics"),
        ("Job failed: x", "error", "message"),
        ("Checkpoint at step 4 unusable (x); starting over", "warn", "message"),
    ]
    # What the new code writes goes back too.
    _insert_event(url, "info", "message", "Checkpoint created at step 6")
    command.downgrade(alembic_config(url), "0008")
    assert current_revision(url) == "0008"
    assert _event_values(url) == [
        *before,
        ("Checkpoint saved at step 6", "info", "checkpoint"),
    ]
    upgrade(url)
    _check_schema(url)


def test_sqlite_event_values_up_and_down(tmp_path: Path) -> None:
    _event_values_up_and_down(f"sqlite:///{tmp_path / 'events.db'}")


@pytest.mark.postgres
def test_postgres_event_values_up_and_down() -> None:
    with scratch_postgres_database() as url:
        _event_values_up_and_down(url)
