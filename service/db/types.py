"""Column types shared by the models, chosen to behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_unix(value: datetime | None) -> int | None:
    """Unix seconds, the timestamp format of every public object (as in OpenAI's API)."""
    return None if value is None else int(value.timestamp())


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp stored as UTC.

    PostgreSQL keeps ``timestamptz``. SQLite has no time zone type, so values are stored as
    naive UTC text (SQLAlchemy's fixed-width format, so string order is time order and SQL
    comparisons such as ``lease_expires_at < :now`` stay correct) and made aware on load.
    Naive datetimes are rejected on the way in: guessing their zone is how bugs start.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime given to a UTC column; use an aware datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
