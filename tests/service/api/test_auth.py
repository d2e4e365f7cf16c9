"""API keys, tenants, the admin endpoints and the first-start bootstrap."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.models import ApiKey, Tenant
from service.main import create_app
from service.state import app_state
from service.tenants.keys import hash_api_key
from tests.service.conftest import make_settings
from tests.service.helpers import Headers, assert_error, create_dataset, default_auth


def test_bootstrap_writes_default_key_file_0600(
    client: TestClient, settings: Settings, db: sessionmaker[Session]
) -> None:
    path = settings.default_key_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_text().strip()
    assert secret.startswith("lpx_") and len(secret) > 40
    with db() as session:
        tenants = session.scalars(select(Tenant)).all()
        assert [t.name for t in tenants] == ["default"]
        key = session.scalars(select(ApiKey)).one()
        # Only the hash and a short prefix are stored, never the secret.
        assert key.key_hash == hash_api_key(secret) and key.key_hash != secret
        assert key.prefix == secret[:8]
    resp = client.get("/v1/datasets", headers={"Authorization": f"Bearer {secret}"})
    assert resp.status_code == 200


def test_bootstrap_runs_only_on_an_empty_database(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings, hooks=[])):
        pass
    first = settings.default_key_path.read_text()
    settings.default_key_path.unlink()
    with TestClient(create_app(settings, hooks=[])) as test_client:
        factory = app_state(test_client.app).sessionmaker
        with factory() as session:
            assert len(session.scalars(select(ApiKey)).all()) == 1
    assert not settings.default_key_path.exists()  # no second key was made
    assert first.startswith("lpx_")


def test_a_new_sqlite_database_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    # It holds every tenant's datasets and adapter weights; SQLite made it 0644 under the
    # default umask, readable by every local user, beside a 0600 key file.
    settings = make_settings(tmp_path / "data")
    with TestClient(create_app(settings, hooks=[])) as test_client:
        create_dataset(test_client, default_auth(settings))
        files = sorted((tmp_path / "data").glob("loraplex.db*"))
        assert [f.name for f in files] == ["loraplex.db", "loraplex.db-shm", "loraplex.db-wal"]
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {
            f.name: 0o600 for f in files
        }


def test_missing_key_is_401(client: TestClient) -> None:
    resp = client.get("/v1/datasets")
    assert_error(resp, 401, code="missing_api_key", type="authentication_error")
    assert resp.headers["www-authenticate"] == "Bearer"


def test_wrong_key_is_401(client: TestClient) -> None:
    resp = client.get("/v1/datasets", headers={"Authorization": "Bearer lpx_not-a-real-key"})
    assert_error(resp, 401, code="invalid_api_key")


def test_malformed_authorization_header_is_401(client: TestClient, settings: Settings) -> None:
    secret = settings.default_key_path.read_text().strip()
    resp = client.get("/v1/datasets", headers={"Authorization": f"Basic {secret}"})
    assert_error(resp, 401, code="missing_api_key")


def test_revoked_key_is_401(client: TestClient, admin: Headers) -> None:
    created = client.post("/v1/tenants", json={"name": "acme"}, headers=admin).json()
    key = created["api_key"]
    headers = {"Authorization": f"Bearer {key['key']}"}
    assert client.get("/v1/datasets", headers=headers).status_code == 200

    resp = client.delete(f"/v1/tenants/{created['id']}/keys/{key['id']}", headers=admin)
    assert resp.status_code == 200
    assert resp.json() == {"id": key["id"], "object": "api_key", "deleted": True}

    assert_error(client.get("/v1/datasets", headers=headers), 401, code="revoked_api_key")
    keys = client.get(f"/v1/tenants/{created['id']}/keys", headers=admin).json()["data"]
    assert keys[0]["revoked_at"] is not None


def test_admin_creates_tenants_and_keys(client: TestClient, admin: Headers) -> None:
    resp = client.post("/v1/tenants", json={"name": "acme"}, headers=admin)
    assert resp.status_code == 200
    tenant = resp.json()
    assert tenant["object"] == "tenant" and tenant["name"] == "acme"
    first_key = tenant["api_key"]
    assert first_key["key"].startswith("lpx_") and first_key["prefix"] == first_key["key"][:8]

    resp = client.post(
        f"/v1/tenants/{tenant['id']}/keys", json={"name": "ci", "is_admin": False}, headers=admin
    )
    second = resp.json()
    assert second["name"] == "ci" and second["key"] != first_key["key"]

    listed = client.get(f"/v1/tenants/{tenant['id']}/keys", headers=admin).json()
    assert listed["object"] == "list"
    assert {k["id"] for k in listed["data"]} == {first_key["id"], second["id"]}
    for k in listed["data"]:
        assert "key" not in k and "key_hash" not in k  # never the secret, nor its hash
        assert first_key["key"] not in str(k)

    names = [t["name"] for t in client.get("/v1/tenants", headers=admin).json()["data"]]
    assert set(names) == {"default", "acme"}


def test_duplicate_tenant_name_is_409(client: TestClient, admin: Headers) -> None:
    client.post("/v1/tenants", json={"name": "acme"}, headers=admin)
    resp = client.post("/v1/tenants", json={"name": "acme"}, headers=admin)
    assert_error(resp, 409, code="tenant_exists", param="name")


def test_tenant_admin_endpoints_need_admin(client: TestClient, auth: Headers) -> None:
    assert_error(client.get("/v1/tenants", headers=auth), 403, code="admin_required")
    assert_error(
        client.post("/v1/tenants", json={"name": "x"}, headers=auth), 403, code="admin_required"
    )
    assert_error(client.get("/v1/tenants"), 401, code="missing_api_key")


def test_unknown_tenant_and_key_are_404(client: TestClient, admin: Headers) -> None:
    assert_error(client.get("/v1/tenants/tenant-nope/keys", headers=admin), 404)
    tenant_id = client.get("/v1/tenants", headers=admin).json()["data"][0]["id"]
    assert_error(client.delete(f"/v1/tenants/{tenant_id}/keys/key-nope", headers=admin), 404)


def test_admin_db_key_manages_tenants_and_acts_as_its_tenant(
    client: TestClient, admin: Headers
) -> None:
    tenant_id = client.get("/v1/tenants", headers=admin).json()["data"][0]["id"]
    resp = client.post(f"/v1/tenants/{tenant_id}/keys", json={"is_admin": True}, headers=admin)
    headers = {"Authorization": f"Bearer {resp.json()['key']}"}
    assert (
        client.post("/v1/tenants", json={"name": "made-by-db-admin"}, headers=headers).status_code
        == 200
    )
    assert client.get("/v1/datasets", headers=headers).status_code == 200


def test_env_admin_key_is_not_a_tenant(client: TestClient, admin: Headers) -> None:
    assert_error(client.get("/v1/datasets", headers=admin), 403, code="tenant_key_required")


def test_auth_disabled_acts_as_default_tenant(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, auth_disabled=True, host="127.0.0.1")
    with TestClient(create_app(settings, hooks=[])) as test_client:
        dataset_id = create_dataset(test_client, {})
        # A key of the default tenant sees the same data.
        key = settings.default_key_path.read_text().strip()
        resp = test_client.get(
            f"/v1/datasets/{dataset_id}", headers={"Authorization": f"Bearer {key}"}
        )
        assert resp.status_code == 200


def test_new_tenant_key_works_and_is_isolated(
    client: TestClient, auth: Headers, new_tenant: Callable[[str], Headers]
) -> None:
    acme = new_tenant("acme")
    dataset_id = create_dataset(client, acme)
    assert client.get(f"/v1/datasets/{dataset_id}", headers=acme).status_code == 200
    assert_error(client.get(f"/v1/datasets/{dataset_id}", headers=auth), 404)
