"""Run Alembic migrations from code (start-up and ``loraplex migrate``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config

from service.db.session import ensure_sqlite_file, normalize_url

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

MIGRATIONS_PACKAGE = "migrations"


def migrations_dir() -> Path:
    """The folder of the installed ``migrations`` package (``env.py``, ``versions/``).

    Found through the import system, not relative to this file: a wheel installs
    ``migrations`` as a top-level package in site-packages, an editable install maps it to the
    source tree, and both resolve here the same way.
    """
    spec = importlib.util.find_spec(MIGRATIONS_PACKAGE)
    locations = None if spec is None else spec.submodule_search_locations
    if not locations:
        raise RuntimeError(
            f"the {MIGRATIONS_PACKAGE!r} package is not installed: reinstall loraplex "
            "(in a source checkout: pip install -e .)"
        )
    path = Path(next(iter(locations)))
    if not (path / "env.py").is_file():
        raise RuntimeError(f"Alembic migrations not found at {path} (no env.py)")
    return path


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    # Passed as an attribute, not an ini option: configparser would choke on '%' in URLs.
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """``alembic upgrade head`` on ``url``; safe to run on every start."""
    ensure_sqlite_file(url)
    command.upgrade(alembic_config(url), revision)


def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def head_revision() -> str:
    """The newest revision in ``migrations/versions`` (what ``upgrade`` brings a database to)."""
    head = _scripts().get_current_head()
    assert head is not None
    return head


def known_revision(revision: str) -> bool:
    """Whether ``revision`` is in ``migrations/versions``: not, when a newer loraplex
    migrated the database (``upgrade`` would fail to locate it)."""
    return any(script.revision == revision for script in _scripts().walk_revisions())


def current_revision(url: str) -> str | None:
    """The revision the database is at (None before the first migration)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    # A plain engine, without make_db_engine's SQLite pragmas: start-up checks read the
    # revision of an existing file before anything is written, and journal_mode=WAL would
    # rewrite its header.
    db_engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        with db_engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        db_engine.dispose()
