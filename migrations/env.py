"""Alembic environment for loraplex.

The URL comes from, in order: ``config.attributes["url"]`` (``service.db.migrate``),
``-x url=...`` on the command line, then ``service.config.Settings`` (``LORAPLEX_*``).
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import pool, text

from service.db.models import Base
from service.db.session import make_db_engine
from service.db.types import UTCDateTime

config = context.config

# Only the CLI has an ini file; when called from the app, leave its logging alone.
if config.config_file_name is not None and not config.attributes.get("url"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    if url:
        return str(url)
    from service.config import Settings

    return Settings().db_url


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    # Migrations must not import app types: a UTC timestamp is a plain timestamptz column.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_item=_render_item,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
        render_as_batch=True,
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=_database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


# Any constant shared by every loraplex process: ``pg_advisory_xact_lock`` key for migrations.
MIGRATION_LOCK_KEY = 0x6C6F7261706C6578  # "loraplex"


def run_migrations_online() -> None:
    # The app's database engine factory: same SQLite pragmas (WAL, busy_timeout, foreign keys), and
    # WAL makes the DDL below far cheaper than one fsync'd journal per statement.
    connectable = make_db_engine(_database_url(), poolclass=pool.NullPool)
    with connectable.connect() as connection:
        _configure(connection=connection)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Every API replica and worker runs `upgrade` at start; on one PostgreSQL they
                # may start together. The first takes this lock and migrates (DDL is
                # transactional there); the others wait, then find the schema at head.
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            context.run_migrations()
    connectable.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
