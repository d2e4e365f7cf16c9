"""Two tenants, every route: tenant B can never see, use or touch tenant A's objects.

B gets exactly what it would get for an id or name that does not exist (404, standard error
body), never a 403 that would confirm the object is there. Same-name adapters in two tenants
are different adapters: each tenant is served (and exports) its own weights, whatever the
serving caches hold. The app runs its real serving hook on the tiny random base.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load as st_load
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.adapter import Adapter
from core.base import FrozenBase
from service.db.models import AdapterRow, Checkpoint, Dataset, Job, JobStatus
from service.state import app_state
from tests.core.inference.helpers import lora, random_adapter, reference
from tests.service.helpers import (
    CLASSIFICATION_ROWS,
    Headers,
    add_queued_job,
    add_tenant,
    assert_error,
    store_adapter,
)

TEXTS = ["a wonderful film", "dull and slow", "the plot makes no sense at all", "fun"]
PAIRS = [{"chosen": "a good answer", "rejected": "bad"}, {"chosen": "yes", "rejected": "no"}]


@dataclass
class Owned:
    """Tenant A's objects, which tenant B probes."""

    dataset: str
    preference_dataset: str
    job: str
    adapter: str  # classification, A only
    reward_adapter: str  # reward, A only
    shared_name: str  # both tenants own an adapter with this name


@pytest.fixture
def db(serving_client: TestClient) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = app_state(serving_client.app).sessionmaker
    return factory


@pytest.fixture
def tenant_b(serving_client: TestClient, admin: Headers) -> Headers:
    resp = serving_client.post("/v1/tenants", json={"name": "tenant-b"}, headers=admin)
    assert resp.status_code == 200, resp.text
    return {"Authorization": f"Bearer {resp.json()['api_key']['key']}"}


def _base(client: TestClient) -> FrozenBase:
    base: FrozenBase = app_state(client.app).require_base_model()
    return base


@pytest.fixture
def owned(
    serving_client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> tuple[Owned, dict[str, Adapter]]:
    """Tenant A (the default tenant, ``auth``) owns one of everything."""
    c, base = serving_client, _base(serving_client)
    ds = c.post(
        "/v1/datasets",
        headers=auth,
        json={"kind": "classification", "name": "a-data", "records": CLASSIFICATION_ROWS},
    )
    assert ds.status_code == 200, ds.text
    pref = c.post("/v1/datasets", headers=auth, json={"kind": "preference", "records": PAIRS})
    assert pref.status_code == 200, pref.text
    job = c.post(
        "/v1/fine_tuning/jobs",
        headers=auth,
        json={"training_file": ds.json()["id"], "adapter_name": "a-training"},
    )
    assert job.status_code == 200, job.text
    with db() as session:  # a checkpoint, as a worker would have saved
        row = session.get(Job, job.json()["id"])
        assert row is not None
        session.add(Checkpoint(job_id=row.id, tenant_id=row.tenant_id, step=5, state=b"x"))
        session.commit()
    adapters = {
        "a-only": lora(base, r=4, seed=11),
        "a-reward": random_adapter(base, "lora", {"r": 2}, None, seed=12),
        "sentiment": lora(base, r=4, seed=13),
    }
    for name, adapter in adapters.items():
        store_adapter(c, auth, name, adapter)
    return (
        Owned(
            dataset=ds.json()["id"],
            preference_dataset=pref.json()["id"],
            job=job.json()["id"],
            adapter="a-only",
            reward_adapter="a-reward",
            shared_name="sentiment",
        ),
        adapters,
    )


# --- every route with an object id: 404 for the other tenant ----------------------------------

Call = tuple[str, str, dict[str, Any] | None]

ROUTES: dict[str, Callable[[Owned], Call]] = {
    "get dataset": lambda o: ("GET", f"/v1/datasets/{o.dataset}", None),
    "delete dataset": lambda o: ("DELETE", f"/v1/datasets/{o.dataset}", None),
    "get file": lambda o: ("GET", f"/v1/files/{o.dataset}", None),
    "get file content": lambda o: ("GET", f"/v1/files/{o.dataset}/content", None),
    "delete file": lambda o: ("DELETE", f"/v1/files/{o.dataset}", None),
    "get job": lambda o: ("GET", f"/v1/fine_tuning/jobs/{o.job}", None),
    "job events": lambda o: ("GET", f"/v1/fine_tuning/jobs/{o.job}/events", None),
    "job event stream": lambda o: ("GET", f"/v1/fine_tuning/jobs/{o.job}/events/stream", None),
    "job checkpoints": lambda o: ("GET", f"/v1/fine_tuning/jobs/{o.job}/checkpoints", None),
    "cancel job": lambda o: ("POST", f"/v1/fine_tuning/jobs/{o.job}/cancel", None),
    "train on A's file": lambda o: ("POST", "/v1/fine_tuning/jobs", {"training_file": o.dataset}),
    "validate on A's file": lambda o: (
        "POST",
        "/v1/fine_tuning/jobs",
        {"training_file": "<own>", "validation_file": o.dataset},
    ),
    "get adapter": lambda o: ("GET", f"/v1/adapters/{o.adapter}", None),
    "export adapter": lambda o: ("GET", f"/v1/adapters/{o.adapter}/export", None),
    "export adapter loraplex": lambda o: (
        "GET",
        f"/v1/adapters/{o.adapter}/export?format=loraplex",
        None,
    ),
    "delete adapter": lambda o: ("DELETE", f"/v1/adapters/{o.adapter}", None),
    "get model": lambda o: ("GET", f"/v1/models/{o.adapter}", None),
    "delete model": lambda o: ("DELETE", f"/v1/models/{o.adapter}", None),
    "predict": lambda o: ("POST", f"/predict?adapter={o.adapter}", {"inputs": TEXTS}),
    "predict merged": lambda o: (
        "POST",
        f"/predict?adapter={o.adapter}&mode=merged",
        {"inputs": TEXTS},
    ),
    "reward compare": lambda o: (
        "POST",
        f"/reward/compare?adapter={o.reward_adapter}",
        {"response_a": "a", "response_b": "b"},
    ),
}


def _call(client: TestClient, headers: Headers, call: Call) -> Any:
    method, url, body = call
    return client.request(method, url, headers=headers, json=body)


@pytest.mark.parametrize("route", list(ROUTES))
def test_other_tenants_objects_are_404_on_every_route(
    serving_client: TestClient,
    auth: Headers,
    tenant_b: Headers,
    owned: tuple[Owned, dict[str, Adapter]],
    route: str,
) -> None:
    o, _ = owned
    method, url, body = ROUTES[route](o)
    if body is not None and body.get("training_file") == "<own>":
        own = serving_client.post(
            "/v1/datasets",
            headers=tenant_b,
            json={"kind": "classification", "records": CLASSIFICATION_ROWS},
        )
        body = {**body, "training_file": own.json()["id"]}
    resp = _call(serving_client, tenant_b, (method, url, body))
    error = assert_error(resp, 404, type="not_found_error")
    assert "tenant" not in error["message"].lower()

    # The same request with an id that never existed answers the same way (status and code):
    # B cannot tell "someone else's" from "nobody's".
    fake = (
        url.replace(o.dataset, "ds_doesnotexist")
        .replace(o.job, "ftjob_doesnotexist")
        .replace(o.reward_adapter, "no-such-adapter")
        .replace(o.adapter, "no-such-adapter")
    )
    fake_body = body
    if body is not None and "training_file" in body:
        fake_body = {
            k: (v.replace(o.dataset, "ds_doesnotexist") if isinstance(v, str) else v)
            for k, v in body.items()
        }
    unknown = _call(serving_client, tenant_b, (method, fake, fake_body))
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == error["code"]

    # And tenant A still has (and can use) the object.
    if method != "POST" or route == "cancel job":
        check = {
            "dataset": f"/v1/datasets/{o.dataset}",
            "file": f"/v1/datasets/{o.dataset}",
            "job": f"/v1/fine_tuning/jobs/{o.job}",
            "adapter": f"/v1/adapters/{o.adapter}",
            "model": f"/v1/adapters/{o.adapter}",
        }
        kind = next(k for k in check if k in route)
        assert serving_client.get(check[kind], headers=auth).status_code == 200


def test_b_changes_nothing_of_a(
    serving_client: TestClient,
    auth: Headers,
    tenant_b: Headers,
    owned: tuple[Owned, dict[str, Adapter]],
    db: sessionmaker[Session],
) -> None:
    """After B tried every destructive route on A's objects, A's objects are untouched."""
    o, _ = owned
    for route, make in ROUTES.items():
        call = make(o)
        if call[0] in ("DELETE", "POST") and call[2] is None:
            assert _call(serving_client, tenant_b, call).status_code == 404, route
    with db() as session:
        assert session.get(Dataset, o.dataset) is not None
        job = session.get(Job, o.job)
        assert job is not None and job.status == JobStatus.QUEUED and not job.cancel_requested
        names = set(
            session.scalars(select(AdapterRow.name).where(AdapterRow.tenant_id == job.tenant_id))
        )
        assert names == {"a-only", "a-reward", "sentiment"}
    resp = serving_client.post(
        f"/predict?adapter={o.adapter}", json={"inputs": TEXTS}, headers=auth
    )
    assert resp.status_code == 200, resp.text


def test_listings_show_only_the_callers_objects(
    serving_client: TestClient,
    auth: Headers,
    tenant_b: Headers,
    owned: tuple[Owned, dict[str, Adapter]],
) -> None:
    o, _ = owned
    c = serving_client
    b_ds = c.post(
        "/v1/datasets",
        headers=tenant_b,
        json={"kind": "classification", "records": CLASSIFICATION_ROWS},
    ).json()["id"]
    b_job = c.post("/v1/fine_tuning/jobs", headers=tenant_b, json={"training_file": b_ds}).json()
    store_adapter(c, tenant_b, "b-only", lora(_base(c), r=2, seed=21))

    def ids(url: str, headers: Headers, key: str = "id") -> set[str]:
        resp = c.get(url, headers=headers)
        assert resp.status_code == 200, resp.text
        return {item[key] for item in resp.json()["data"]}

    assert ids("/v1/datasets", tenant_b) == {b_ds}
    assert ids("/v1/files", tenant_b) == {b_ds}
    assert ids("/v1/fine_tuning/jobs", tenant_b) == {b_job["id"]}
    assert ids("/v1/adapters", tenant_b, "name") == {"b-only"}
    models = ids("/v1/models", tenant_b)
    assert "b-only" in models and not models & {"a-only", "a-reward", "sentiment"}

    assert ids("/v1/datasets", auth) == {o.dataset, o.preference_dataset}
    assert ids("/v1/fine_tuning/jobs", auth) == {o.job}
    assert ids("/v1/adapters", auth, "name") == {"a-only", "a-reward", "sentiment"}
    # A cursor from the other tenant's listing is as unknown as one that never existed.
    for after in (o.dataset, "file-doesnotexist"):
        resp = c.get(f"/v1/datasets?after={after}", headers=tenant_b)
        assert_error(resp, 422, param="after", code="invalid_cursor")


def test_adapter_names_are_per_tenant(
    serving_client: TestClient,
    tenant_b: Headers,
    owned: tuple[Owned, dict[str, Adapter]],
) -> None:
    """A name A uses (as an adapter or an active job's target) is free for B."""
    c = serving_client
    b_ds = c.post(
        "/v1/datasets",
        headers=tenant_b,
        json={"kind": "classification", "records": CLASSIFICATION_ROWS},
    ).json()["id"]
    for name in ("a-only", "a-training"):
        resp = c.post(
            "/v1/fine_tuning/jobs",
            headers=tenant_b,
            json={"training_file": b_ds, "adapter_name": name},
        )
        assert resp.status_code == 200, resp.text
        c.post(f"/v1/fine_tuning/jobs/{resp.json()['id']}/cancel", headers=tenant_b)


# --- same name, two tenants: each is served its own weights -----------------------------------


def _probabilities(resp: Any) -> list[dict[str, float]]:
    assert resp.status_code == 200, resp.text
    return [p["probabilities"] for p in resp.json()["predictions"]]


def _expected(base: FrozenBase, adapter: Adapter) -> list[dict[str, float]]:
    out = []
    for text in TEXTS:
        probs = torch.softmax(reference(base, adapter, text).float(), -1).tolist()
        out.append(dict(zip(adapter.head.label_names, probs, strict=True)))
    return out


def _assert_close(got: list[dict[str, float]], want: list[dict[str, float]]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for label in w:
            assert g[label] == pytest.approx(w[label], abs=1e-4)


def _differ(a: list[dict[str, float]], b: list[dict[str, float]]) -> bool:
    return any(abs(x[k] - y[k]) > 1e-3 for x, y in zip(a, b, strict=True) for k in x)


def _store_same_version(
    c: TestClient, a: Headers, b: Headers, name: str, adapter: Adapter
) -> Adapter:
    """Store B's ``name`` with the same version number as A's: a cache keyed by (name,
    version) without the tenant would then mix the two up."""
    a_version = c.get(f"/v1/adapters/{name}", headers=a).json()["version"]
    for i in range(a_version - 1):
        store_adapter(c, b, f"filler-{i}", lora(_base(c), r=2, seed=50 + i))
    assert store_adapter(c, b, name, adapter) == a_version
    return adapter


@pytest.mark.parametrize("mode", ["unmerged", "merged", "auto"])
def test_same_adapter_name_in_two_tenants_serves_each_its_own_weights(
    serving_client: TestClient,
    auth: Headers,
    tenant_b: Headers,
    owned: tuple[Owned, dict[str, Adapter]],
    mode: str,
) -> None:
    c, base = serving_client, _base(serving_client)
    o, a_adapters = owned
    b_sentiment = _store_same_version(c, auth, tenant_b, o.shared_name, lora(base, r=4, seed=99))
    want_a = _expected(base, a_adapters[o.shared_name])
    want_b = _expected(base, b_sentiment)
    assert _differ(want_a, want_b), "the two adapters must give different answers"

    url = f"/predict?adapter={o.shared_name}&mode={mode}"
    # Alternate, so whichever copy is resident (bank slot or merged cache) was loaded for the
    # other tenant's request just before.
    for _ in range(3):
        _assert_close(_probabilities(c.post(url, json={"inputs": TEXTS}, headers=auth)), want_a)
        _assert_close(_probabilities(c.post(url, json={"inputs": TEXTS}, headers=tenant_b)), want_b)


def test_same_name_exports_and_deletes_stay_per_tenant(
    serving_client: TestClient,
    auth: Headers,
    tenant_b: Headers,
    owned: tuple[Owned, dict[str, Adapter]],
    db: sessionmaker[Session],
) -> None:
    c, base = serving_client, _base(serving_client)
    o, a_adapters = owned
    b_sentiment = _store_same_version(c, auth, tenant_b, o.shared_name, lora(base, r=4, seed=99))
    url = f"/predict?adapter={o.shared_name}&mode=unmerged"
    _probabilities(c.post(url, json={"inputs": TEXTS}, headers=auth))  # A's copy resident

    def exported(headers: Headers) -> dict[str, torch.Tensor]:
        resp = c.get(f"/v1/adapters/{o.shared_name}/export?format=loraplex", headers=headers)
        assert resp.status_code == 200, resp.text
        with zipfile.ZipFile(io.BytesIO(resp.content)) as zf:
            weights = [n for n in zf.namelist() if n.endswith(".safetensors")]
            assert len(weights) == 1
            return st_load(zf.read(weights[0]))

    for headers, adapter in ((auth, a_adapters[o.shared_name]), (tenant_b, b_sentiment)):
        got = exported(headers)
        want = {
            **{f"method.{k}": v for k, v in adapter.method_state.items()},
            **{f"head.{k}": v for k, v in adapter.head_state.items()},
        }
        assert set(got) == set(want)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v.float(), rtol=0, atol=0)

    # B deletes its own "sentiment": A's is untouched and still served; B's is gone.
    assert c.delete(f"/v1/adapters/{o.shared_name}", headers=tenant_b).status_code == 200
    assert_error(c.post(url, json={"inputs": TEXTS}, headers=tenant_b), 404, param="adapter")
    _assert_close(
        _probabilities(c.post(url, json={"inputs": TEXTS}, headers=auth)),
        _expected(base, a_adapters[o.shared_name]),
    )
    with db() as session:
        count = session.scalar(
            select(func.count()).select_from(AdapterRow).where(AdapterRow.name == o.shared_name)
        )
    assert count == 1


# --- keys ------------------------------------------------------------------------------------


def test_revoking_bs_key_does_not_touch_a(
    serving_client: TestClient, auth: Headers, admin: Headers
) -> None:
    c = serving_client
    created = c.post("/v1/tenants", json={"name": "short-lived"}, headers=admin).json()
    key = created["api_key"]
    b = {"Authorization": f"Bearer {key['key']}"}
    assert c.get("/v1/datasets", headers=b).status_code == 200
    listed = c.get(f"/v1/tenants/{created['id']}/keys", headers=admin).json()["data"]
    assert [k["prefix"] for k in listed] == [key["key"][:8]]
    assert all("key" not in k and "key_hash" not in k for k in listed)
    resp = c.delete(f"/v1/tenants/{created['id']}/keys/{key['id']}", headers=admin)
    assert resp.status_code == 200
    assert_error(c.get("/v1/datasets", headers=b), 401, code="revoked_api_key")
    assert c.get("/v1/datasets", headers=auth).status_code == 200
    # A tenant key cannot revoke keys, not even of its own tenant.
    assert_error(
        c.delete(f"/v1/tenants/{created['id']}/keys/{key['id']}", headers=auth),
        403,
        code="admin_required",
    )


def test_unauthenticated_metrics_name_no_job_and_sum_the_training_speed(
    client: TestClient, db: sessionmaker[Session]
) -> None:
    """/metrics answers without a key: its training speed was labelled by job id, which showed
    every tenant's running jobs (and grew a series per job)."""
    ids = [add_queued_job(db, add_tenant(db, name), name=name) for name in ("t1", "t2", "t3")]
    with db() as session:
        for job_id, rate in zip(ids[:2], (2.5, 1.5), strict=True):
            job = session.get(Job, job_id)
            assert job is not None
            job.status, job.metrics = JobStatus.RUNNING, {"steps_per_second": rate}
        session.commit()
    text = client.get("/metrics").text
    assert not any(job_id in text for job_id in ids)
    samples = {
        (s.name, s.labels.get("status", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in ("loraplex_training_steps_per_second", "loraplex_jobs")
    }
    assert samples[("loraplex_training_steps_per_second", "")] == 4.0
    assert samples[("loraplex_jobs", "running")] == 2
    assert samples[("loraplex_jobs", "queued")] == 1
