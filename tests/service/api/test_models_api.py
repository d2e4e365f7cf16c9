"""``/v1/models``: the base encoder and the caller's adapters as OpenAI ``model`` objects."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.base import FrozenBase
from service.config import Settings
from service.db.models import AdapterRow, Tenant
from service.main import create_app
from tests.service.helpers import Headers, adapter_row, assert_error, serve_base


@pytest.fixture
def client(settings: Settings, tiny_base: FrozenBase) -> Iterator[TestClient]:
    settings.base_model_name = tiny_base.name
    settings.bases = [tiny_base.name]
    with TestClient(create_app(settings, hooks=[serve_base(tiny_base)])) as test_client:
        yield test_client


def _add(db: sessionmaker[Session], tenant: str, *names: str) -> None:
    with db() as session:
        tenant_id = session.scalars(select(Tenant.id).where(Tenant.name == tenant)).one()
        for name in names:
            session.add(adapter_row(tenant_id, name, base_model="loraplex-tests/tiny-bert"))
            session.commit()


def test_list_has_the_base_then_adapters(
    client: TestClient, auth: Headers, db: sessionmaker[Session], tiny_base: FrozenBase
) -> None:
    _add(db, "default", "first", "second")
    body = client.get("/v1/models", headers=auth).json()
    assert body["object"] == "list"
    base, *adapters = body["data"]
    assert base["id"] == tiny_base.name and base["object"] == "model"
    assert base["owned_by"] == "system" and base["kind"] == "base"
    assert isinstance(base["created"], int) and base["created"] > 0
    assert base["hidden_size"] == 32 and base["num_layers"] == 2
    assert base["max_model_len"] == tiny_base.max_length
    assert base["fingerprint"] == tiny_base.fingerprint
    assert [a["id"] for a in adapters] == ["second", "first"]
    first = adapters[1]
    assert first["object"] == "model" and first["kind"] == "adapter"
    assert first["parent"] == first["root"] == tiny_base.name
    assert first["owned_by"].startswith("tenant-")
    assert first["adapter_id"].startswith("adapter-") and first["version"] == 1
    assert first["method"] == "lora" and first["task"] == "classification"
    assert first["label_names"] == ["neg", "pos"]
    assert "hidden_size" not in first  # nulls are left out


def test_retrieve_base_with_a_slash_in_its_id(
    client: TestClient, auth: Headers, tiny_base: FrozenBase
) -> None:
    # The SDK percent-encodes the slash; the server decodes it before routing.
    for path in (tiny_base.name, quote(tiny_base.name, safe="")):
        resp = client.get(f"/v1/models/{path}", headers=auth)
        assert resp.status_code == 200, resp.text
        assert resp.json()["id"] == tiny_base.name


def test_retrieve_and_delete_adapter(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    _add(db, "default", "sentiment")
    model = client.get("/v1/models/sentiment", headers=auth).json()
    assert model["id"] == "sentiment" and model["kind"] == "adapter"
    resp = client.delete("/v1/models/sentiment", headers=auth)
    assert resp.status_code == 200
    assert resp.json() == {"id": "sentiment", "object": "model", "deleted": True}
    assert_error(client.get("/v1/models/sentiment", headers=auth), 404, code="model_not_found")
    assert_error(client.get("/v1/adapters/sentiment", headers=auth), 404)
    with db() as session:
        assert session.scalars(select(AdapterRow)).all() == []


def test_the_base_cannot_be_deleted(
    client: TestClient, auth: Headers, tiny_base: FrozenBase
) -> None:
    resp = client.delete(f"/v1/models/{tiny_base.name}", headers=auth)
    assert_error(resp, 403, code="base_model_not_deletable", type="permission_error")


def test_other_tenants_adapters_are_404(
    client: TestClient, auth: Headers, other_auth: Headers, db: sessionmaker[Session]
) -> None:
    _add(db, "other", "theirs")
    ids = [m["id"] for m in client.get("/v1/models", headers=auth).json()["data"]]
    assert "theirs" not in ids
    assert_error(client.get("/v1/models/theirs", headers=auth), 404, code="model_not_found")
    assert_error(client.delete("/v1/models/theirs", headers=auth), 404)
    assert client.get("/v1/models/theirs", headers=other_auth).status_code == 200


def test_models_need_a_key(client: TestClient) -> None:
    assert_error(client.get("/v1/models"), 401)


def test_without_a_loaded_base_the_configured_name_is_listed(
    settings: Settings, auth: Headers
) -> None:
    # ``auth`` started (and stopped) the default app; this one has no serving hook at all.
    with TestClient(create_app(settings, hooks=[])) as bare:
        data = bare.get("/v1/models", headers=auth).json()["data"]
    assert data == [
        {
            "id": settings.base_model_name,
            "object": "model",
            "created": 0,
            "owned_by": "system",
            "kind": "base",
            "base_kind": "encoder",
        }
    ]
