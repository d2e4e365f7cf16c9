"""Engine set-up and column types."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import ApiKey, Tenant


@pytest.mark.sqlite_only
def test_sqlite_pragmas(db: sessionmaker[Session]) -> None:
    with db() as session:
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert session.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert session.execute(text("PRAGMA busy_timeout")).scalar() == 5000


def test_foreign_keys_are_enforced(migrated_db: sessionmaker[Session]) -> None:
    with migrated_db() as session:
        session.add(ApiKey(tenant_id="tenant-missing", prefix="lpx_abcd", key_hash="0" * 64))
        with pytest.raises(IntegrityError):
            session.commit()


def test_timestamps_round_trip_as_aware_utc(migrated_db: sessionmaker[Session]) -> None:
    plus_two = timezone(timedelta(hours=2))
    moment = datetime(2030, 1, 2, 14, 30, 15, 123456, tzinfo=plus_two)
    with migrated_db() as session:
        session.add(Tenant(name="t", created_at=moment))
        session.commit()
    with migrated_db() as session:
        loaded = session.scalars(select(Tenant.created_at)).one()
        assert loaded == moment and loaded.tzinfo is not None
        assert loaded.utcoffset() == timedelta(0)
        assert loaded == datetime(2030, 1, 2, 12, 30, 15, 123456, tzinfo=UTC)
        # Comparisons in SQL work across zones too.
        earlier = datetime(2030, 1, 2, 13, 0, tzinfo=plus_two)  # 11:00 UTC
        assert session.scalars(select(Tenant.name).where(Tenant.created_at > earlier)).all() == [
            "t"
        ]


def test_naive_datetimes_are_rejected(migrated_db: sessionmaker[Session]) -> None:
    with migrated_db() as session:
        session.add(Tenant(name="t", created_at=datetime(2030, 1, 1)))
        with pytest.raises(StatementError, match="naive datetime"):
            session.commit()
