"""The inference request path's lookup cache: on with SQLite, off with PostgreSQL, never stale."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from service.serving.lookups import LookupCache
from service.serving.queries import AdapterRef
from service.state import app_state
from tests.core.inference.helpers import lora
from tests.service.helpers import Headers, assert_error, store_adapter


@pytest.fixture
def key_lookups(serving_client: TestClient) -> Iterator[list[str]]:
    """The API-key lookups the app runs against its database, as they happen."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM api_keys" in statement:
            statements.append(statement)

    db_engine = app_state(serving_client.app).db_engine
    event.listen(db_engine, "before_cursor_execute", record)
    yield statements
    event.remove(db_engine, "before_cursor_execute", record)


def _predict(client: TestClient, headers: Headers, name: str) -> Any:
    return client.post(f"/predict?adapter={name}", json={"inputs": ["fine"]}, headers=headers)


def _tenant_with_adapter(
    client: TestClient, admin: Headers, name: str
) -> tuple[str, dict, Headers]:
    created = client.post("/v1/tenants", json={"name": "acme"}, headers=admin).json()
    headers = {"Authorization": f"Bearer {created['api_key']['key']}"}
    base = app_state(client.app).require_base_model()
    store_adapter(client, headers, name, lora(base, r=2, seed=5))
    return created["id"], created["api_key"], headers


def test_a_known_caller_and_adapter_are_looked_up_once_on_sqlite_only(
    serving_client: TestClient, auth: Headers, db_backend: str, key_lookups: list[str]
) -> None:
    base = app_state(serving_client.app).require_base_model()
    store_adapter(serving_client, auth, "s", lora(base, r=2))
    key_lookups.clear()
    for _ in range(3):
        assert _predict(serving_client, auth, "s").status_code == 200
    # SQLite: one API process sees every write, so good answers are remembered.
    # PostgreSQL: other replicas write too; every request asks the database.
    assert len(key_lookups) == (1 if db_backend == "sqlite" else 3)
    metrics = serving_client.get("/metrics").text
    assert ("loraplex_lookup_cache_hits_total 2.0" in metrics) == (db_backend == "sqlite")
    # Failures are never remembered: an unknown adapter is asked for every time.
    key_lookups.clear()
    for _ in range(2):
        assert_error(_predict(serving_client, auth, "nope"), 404, code="adapter_not_found")
    assert len(key_lookups) == 2


def test_a_revoked_key_is_refused_at_once_after_remembered_requests(
    serving_client: TestClient, admin: Headers
) -> None:
    tenant_id, key, headers = _tenant_with_adapter(serving_client, admin, "s")
    assert _predict(serving_client, headers, "s").status_code == 200
    assert _predict(serving_client, headers, "s").status_code == 200  # remembered on SQLite
    resp = serving_client.delete(f"/v1/tenants/{tenant_id}/keys/{key['id']}", headers=admin)
    assert resp.status_code == 200
    assert_error(_predict(serving_client, headers, "s"), 401, code="revoked_api_key")


def test_a_deleted_adapter_is_404_at_once_after_remembered_requests(
    serving_client: TestClient, admin: Headers
) -> None:
    _, _, headers = _tenant_with_adapter(serving_client, admin, "s")
    for _ in range(2):
        assert _predict(serving_client, headers, "s").status_code == 200
    assert serving_client.delete("/v1/adapters/s", headers=headers).status_code == 200
    assert_error(_predict(serving_client, headers, "s"), 404, code="adapter_not_found")


REF = AdapterRef("ad-1", ("t1", "s", 1), "classification", "lora", ("a", "b"), False, 0)


def test_an_answer_read_before_a_drop_is_not_stored() -> None:
    cache = LookupCache()
    generation = cache.generation  # a request starts its database lookup...
    cache.drop_adapter("t1", "s")  # ...a delete commits and drops meanwhile...
    cache.put("hash", "s", REF, "key-1", generation)  # ...the old answer arrives late
    assert cache.get("hash", "s") is None
    cache.put("hash", "s", REF, "key-1", cache.generation)
    assert cache.get("hash", "s") == REF
    cache.drop_key("key-2")  # another key: this entry stays
    assert cache.get("hash", "s") == REF
    cache.drop_key("key-1")
    assert cache.get("hash", "s") is None


def test_entries_expire_and_the_oldest_go_first() -> None:
    cache = LookupCache(ttl=0.05, max_entries=2)
    for name in ("a", "b", "c"):
        cache.put("hash", name, REF, "key-1", cache.generation)
    assert cache.get("hash", "a") is None  # pushed out by "c"
    assert cache.get("hash", "b") == REF and cache.get("hash", "c") == REF
    time.sleep(0.1)
    assert cache.get("hash", "b") is None
