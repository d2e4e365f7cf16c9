"""``/v1/adapters``: metadata only, per tenant, cursor pages by name."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.adapters.records import delete_adapter_row
from service.db.models import AdapterRow, Tenant
from tests.service.helpers import (
    Headers,
    adapter_row,
    assert_error,
    sqlite_db_bytes,
    tenant_id_by_name,
)


def _add(db: sessionmaker[Session], tenant: str, *names: str) -> None:
    with db() as session:
        tenant_id = session.scalars(select(Tenant.id).where(Tenant.name == tenant)).one()
        for name in names:
            session.add(adapter_row(tenant_id, name, weights=b"WEIGHTS" * 100))
            session.commit()  # one commit each: distinct created_at, so a stable order


def test_get_adapter_metadata_without_weights(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    _add(db, "default", "sentiment")
    resp = client.get("/v1/adapters/sentiment", headers=auth)
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "adapter" and body["name"] == "sentiment"
    assert body["id"].startswith("adapter-") and body["version"] == 1
    assert body["label_names"] == ["neg", "pos"] and body["config"] == adapter_row("t", "x").config
    assert body["trainable_params"] == 1234 and body["size_bytes"] == 64
    assert "weights" not in body and "WEIGHTS" not in resp.text


def test_list_and_paginate_by_name(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    _add(db, "default", "a1", "a2", "a3")
    page = client.get("/v1/adapters?limit=2", headers=auth).json()
    assert [a["name"] for a in page["data"]] == ["a3", "a2"] and page["has_more"] is True
    assert page["last_id"] == "a2"
    page2 = client.get("/v1/adapters?limit=2&after=a2", headers=auth).json()
    assert [a["name"] for a in page2["data"]] == ["a1"] and page2["has_more"] is False
    assert "WEIGHTS" not in str(page) + str(page2)


def test_delete_adapter(client: TestClient, auth: Headers, db: sessionmaker[Session]) -> None:
    _add(db, "default", "gone")
    resp = client.delete("/v1/adapters/gone", headers=auth)
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "adapter" and body["deleted"] is True
    assert body["name"] == "gone" and body["id"].startswith("adapter-")
    assert_error(client.get("/v1/adapters/gone", headers=auth), 404, code="adapter_not_found")
    with db() as session:
        assert session.scalars(select(AdapterRow)).all() == []


def test_of_two_deletes_that_both_read_the_adapter_one_deletes_it(
    client: TestClient, db: sessionmaker[Session]
) -> None:
    """Both ran session.delete on their copy: the second matched no row and still answered
    200 (two of eight concurrent DELETEs did)."""
    _add(db, "default", "raced")
    dropped: list[tuple[str, str]] = []
    with db() as first, db() as second:
        rows = [s.scalars(select(AdapterRow)).one() for s in (first, second)]
        assert delete_adapter_row(first, rows[0], [lambda t, n: dropped.append((t, n))])
        assert not delete_adapter_row(second, rows[1], [lambda t, n: dropped.append((t, n))])
    assert [name for _, name in dropped] == ["raced"]  # caches told once
    with db() as session:
        assert session.scalars(select(AdapterRow)).all() == []


def test_unknown_adapter_is_404(client: TestClient, auth: Headers) -> None:
    assert_error(client.get("/v1/adapters/nope", headers=auth), 404, code="adapter_not_found")
    assert_error(client.delete("/v1/adapters/nope", headers=auth), 404)


def test_adapters_are_tenant_isolated(
    client: TestClient, auth: Headers, other_auth: Headers, db: sessionmaker[Session]
) -> None:
    _add(db, "default", "shared-name")
    _add(db, "other", "shared-name", "theirs")
    mine = client.get("/v1/adapters", headers=auth).json()["data"]
    theirs = client.get("/v1/adapters", headers=other_auth).json()["data"]
    assert [a["name"] for a in mine] == ["shared-name"]
    assert {a["name"] for a in theirs} == {"shared-name", "theirs"}
    assert mine[0]["id"] not in {a["id"] for a in theirs}
    assert_error(client.get("/v1/adapters/theirs", headers=auth), 404)
    assert_error(client.delete("/v1/adapters/theirs", headers=auth), 404)
    # Deleting my adapter leaves their same-named one alone.
    client.delete("/v1/adapters/shared-name", headers=auth)
    assert client.get("/v1/adapters/shared-name", headers=other_auth).status_code == 200


@pytest.mark.sqlite_only
def test_deleting_an_adapter_shrinks_the_sqlite_file(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    weights = os.urandom(4 << 20)  # the size of a large LoRA's safetensors
    with db() as session:
        session.add(adapter_row(tenant_id_by_name(db), "big", weights=weights))
        session.commit()
    grown = sqlite_db_bytes(db)
    assert client.delete("/v1/adapters/big", headers=auth).status_code == 200
    assert sqlite_db_bytes(db) < grown - len(weights) // 2
