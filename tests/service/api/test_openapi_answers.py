"""`/openapi.json` documents every answer an operation gives, in the shape it has, and every
example in it is a valid value of its own schema (service.api.openapi).

Generated clients and schemathesis' status-code check read the document: an answer the
server gives but the document leaves out is a bug to them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema_rs
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from tests.service.conftest import make_settings
from tests.service.helpers import (
    ADMIN_KEY,
    Headers,
    create_dataset,
    default_auth,
    job_body,
    jsonl,
    upload,
)


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # No lifespan (no `with`): the document needs no database.
    app = create_app(make_settings(tmp_path_factory.mktemp("openapi")), hooks=[])
    resp = TestClient(app).get("/openapi.json")
    assert resp.status_code == 200
    document: dict[str, Any] = resp.json()
    return document


def _validator(spec: dict[str, Any], schema: dict[str, Any]) -> jsonschema_rs.Validator:
    # The document's `#/components/schemas/...` references resolve against its components.
    return jsonschema_rs.Draft202012Validator(
        {**schema, "components": spec["components"]}, validate_formats=True
    )


def _problems(spec: dict[str, Any], schema: dict[str, Any], value: Any) -> list[str]:
    errors = _validator(spec, schema).iter_errors(value)
    return [f"{e.instance_path}: {e.message}" for e in errors]


# --- error answers ---------------------------------------------------------------------------

# A sample of operations and the error statuses each must document: from its shape (a key:
# 401/503, and 403 unless any key may call it; a path id: 404; a body: 413/422,
# multipart 415) and from what it checks.
_DOCUMENTED = [
    ("get", "/healthz", set()),
    ("get", "/v1/methods", {"401", "503"}),
    ("get", "/v1/adapters/{name}", {"401", "403", "404", "422", "503"}),
    ("post", "/v1/tenants", {"401", "403", "409", "413", "422", "503"}),
    ("get", "/v1/tenants", {"401", "403", "422", "503"}),
    ("post", "/v1/datasets", {"401", "403", "413", "415", "422", "429", "503"}),
    ("post", "/v1/datasets/validate", {"401", "403", "413", "415", "422", "503"}),
    ("post", "/v1/files", {"400", "401", "403", "413", "415", "422", "429", "503"}),
    ("post", "/v1/adapters/import", {"401", "403", "404", "409", "413", "415", "422", "429"}),
    ("post", "/v1/fine_tuning/jobs", {"400", "401", "403", "404", "409", "413", "422", "429"}),
    ("post", "/v1/fine_tuning/jobs/{job_id}/cancel", {"401", "403", "404", "409", "503"}),
    ("delete", "/v1/datasets/{dataset_id}", {"401", "403", "404", "409", "503"}),
    ("post", "/predict", {"400", "401", "403", "404", "409", "413", "422", "503"}),
    ("post", "/v1/completions", {"400", "401", "403", "404", "413", "422", "503"}),
]


@pytest.mark.parametrize(("method", "path", "statuses"), _DOCUMENTED)
def test_operations_document_their_error_answers(
    spec: dict[str, Any], method: str, path: str, statuses: set[str]
) -> None:
    responses = spec["paths"][path][method]["responses"]
    errors = {status for status in responses if not status.startswith("2")}
    assert errors >= statuses, sorted(statuses - errors)
    for status in statuses:
        json = responses[status]["content"]["application/json"]
        assert json["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}, status
        assert responses[status]["description"].strip(), status


def test_403_is_documented_where_some_keys_are_refused(spec: dict[str, Any]) -> None:
    paths = spec["paths"]
    # Any valid key may read the method catalogue; the admin key may not list models (it has
    # no tenant), a tenant key may not create tenants.
    assert "403" not in paths["/v1/methods"]["get"]["responses"]
    assert "403" in paths["/v1/models"]["get"]["responses"]
    assert "403" in paths["/v1/tenants"]["post"]["responses"]


def test_403_is_documented_exactly_where_a_key_gets_one(
    client: TestClient, admin: Headers, auth: Headers
) -> None:
    """Each operation asked with the admin key and with a tenant key (path ids made up: the
    key is checked first): a 403 either gets is documented, and a documented 403 is one of
    them gets."""
    spec: dict[str, Any] = client.app.openapi()  # type: ignore[attr-defined]
    for path, item in spec["paths"].items():
        url = re.sub(r"\{[^}]+\}", "x", path)
        for method, operation in item.items():
            if not operation.get("security"):
                continue
            refused = [
                client.request(method, url, headers=key).status_code == 403 for key in (admin, auth)
            ]
            assert any(refused) == ("403" in operation["responses"]), (method, path, refused)


def test_a_route_s_own_answer_is_kept(spec: dict[str, Any]) -> None:
    # /readyz documents its 503 itself (the checks beside the error): left as it is.
    assert spec["paths"]["/readyz"]["get"]["responses"]["503"]["description"].startswith(
        "Not ready"
    )


@pytest.fixture
def one_job_client(settings: Settings) -> Iterator[TestClient]:
    """The app with room for one job per tenant: the second is the quota's 429."""
    strict = settings.model_copy(update={"max_concurrent_jobs_per_tenant": 1})
    with TestClient(create_app(strict, hooks=[])) as test_client:
        yield test_client


def _answers(client: TestClient, auth: Headers) -> Iterator[tuple[str, str, httpx.Response]]:
    """(method, documented path, real answer) for requests that get every error status."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    yield "get", "/v1/adapters/{name}", client.get("/v1/adapters/nope")
    yield "get", "/v1/adapters/{name}", client.get("/v1/adapters/nope", headers=auth)
    yield "get", "/v1/datasets", client.get("/v1/datasets", headers=admin)
    yield "get", "/v1/tenants", client.get("/v1/tenants", headers=auth)
    yield "post", "/v1/tenants", client.post("/v1/tenants", json={"name": "default"}, headers=admin)
    yield (
        "post",
        "/v1/tenants",
        client.post("/v1/tenants", json={"name": "x" * (2 << 20)}, headers=admin),
    )
    yield (
        "post",
        "/v1/files",
        client.post("/v1/files", json={"purpose": "fine-tune"}, headers=auth),
    )
    yield (
        "post",
        "/v1/files",
        client.post(
            "/v1/files",
            data={"purpose": "assistants"},
            files={"file": ("a.jsonl", b"{}\n")},
            headers=auth,
        ),
    )
    yield "post", "/v1/datasets", upload(client, auth, jsonl([{"text": "no label"}]))
    yield (
        "post",
        "/v1/adapters/import",
        client.post("/v1/adapters/import", data={"name": "a"}, files={"x": b""}, headers=auth),
    )
    training_file = create_dataset(client, auth)
    jobs = "/v1/fine_tuning/jobs"
    yield "post", jobs, client.post(jobs, json=job_body("file-nope"), headers=auth)
    first = client.post(jobs, json=job_body(training_file, adapter_name="a1"), headers=auth)
    assert first.status_code == 200, first.text
    yield "post", jobs, client.post(jobs, json=job_body(training_file), headers=auth)
    yield (
        "post",
        "/v1/chat/completions",
        client.post(
            "/v1/chat/completions",
            json={"model": "a1", "messages": [{"role": "user", "content": "hi"}]},
            headers=auth,
        ),
    )


def test_real_error_answers_are_documented_in_the_shape_they_have(
    one_job_client: TestClient, settings: Settings, spec: dict[str, Any]
) -> None:
    seen: set[int] = set()
    for method, path, resp in _answers(one_job_client, default_auth(settings)):
        where = f"{method.upper()} {path} {resp.status_code} {resp.text[:200]}"
        seen.add(resp.status_code)
        answer = spec["paths"][path][method]["responses"].get(str(resp.status_code))
        assert answer is not None, f"undocumented: {where}"
        schema = answer["content"]["application/json"]["schema"]
        assert not (problems := _problems(spec, schema, resp.json())), (where, problems)
        # The headers documented with it are sent (here: each answer's error sends them).
        for header in answer.get("headers", {}):
            assert header in resp.headers, (where, header)
    assert seen == {400, 401, 403, 404, 409, 413, 415, 422, 429, 503}, sorted(seen)


# --- examples --------------------------------------------------------------------------------


def _examples(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any], Any]]:
    """Every example in the document with the schema it illustrates: a schema's `examples`
    (a list), and a media type's or parameter's `example` or `examples` (a map of Example
    Objects) beside its `schema`."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _examples(item, f"{where}[{index}]")
        return
    if not isinstance(node, dict):
        return
    examples = node.get("examples")
    schema = node.get("schema")
    if isinstance(schema, dict):
        if "example" in node:
            yield f"{where}.example", schema, node["example"]
        for name, example in (examples or {}).items():
            yield f"{where}.examples.{name}", schema, example["value"]
    elif isinstance(examples, list):
        bare = {k: v for k, v in node.items() if k not in ("examples", "example")}
        for index, example in enumerate(examples):
            yield f"{where}.examples[{index}]", bare, example
    for key, value in node.items():
        yield from _examples(value, f"{where}.{key}")


def test_every_example_is_valid_against_its_own_schema(spec: dict[str, Any]) -> None:
    found = list(_examples(spec))
    invalid = [
        f"{where}: {problems}"
        for where, schema, example in found
        if (problems := _problems(spec, schema, example))
    ]
    assert not invalid, f"{len(invalid)} examples fail their schema:\n" + "\n".join(invalid)
    # Every component's and every error answer's: the walk did not miss them.
    assert len(found) >= 150, len(found)
