"""Scratch PostgreSQL databases for the tests (``tests.service.helpers``) and the benchmarks
that need one (``bench.queue_race``), on the server at ``LPX_TEST_POSTGRES_URL``."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def scratch_database(admin_url: str | None = None, prefix: str = "loraplex_race") -> Iterator[str]:
    """A new, empty PostgreSQL database on ``admin_url``'s server, dropped on exit."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin_url = admin_url or os.environ.get("LPX_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL)
    db_engine = create_engine(
        admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with db_engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with db_engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        db_engine.dispose()
