"""The API documents itself: `/openapi.json` describes every field and operation and shows
examples, and `/docs` and `/redoc` work without internet access.

Each test lists every gap it finds, so one run says everything that is left to write.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from service.main import create_app
from tests.service.conftest import make_settings

REF = "#/components/schemas/"
# Sphinx roles and double backticks: shown verbatim by Swagger UI and ReDoc, which read Markdown.
RST = re.compile(r"``|:(?:class|func|data|mod|meth|attr|exc):`")


@pytest.fixture(scope="module")
def docs_client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    # No lifespan (no `with`): the document and the doc pages need no database.
    settings = make_settings(tmp_path_factory.mktemp("docs"))
    return TestClient(create_app(settings, hooks=[]))


@pytest.fixture(scope="module")
def spec(docs_client: TestClient) -> dict[str, Any]:
    resp = docs_client.get("/openapi.json")
    assert resp.status_code == 200
    document: dict[str, Any] = resp.json()
    return document


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield f"{method.upper()} {path}", operation


def _properties(where: str, schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property of ``schema``, nested inline objects and array items included."""
    for name, prop in schema.get("properties", {}).items():
        yield f"{where}.{name}", prop
        yield from _properties(f"{where}.{name}", prop)
        if isinstance(prop.get("items"), dict):
            yield from _properties(f"{where}.{name}[]", prop["items"])


def _component(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any] | None:
    ref = schema.get("$ref", "")
    found: dict[str, Any] | None = spec["components"]["schemas"].get(ref.removeprefix(REF))
    return found if ref.startswith(REF) else None


def _has_example(spec: dict[str, Any], media: dict[str, Any]) -> bool:
    """An example on the media type, or on the schema it names (a list's items for a page,
    every alternative of a union)."""
    if media.get("example") is not None or media.get("examples"):
        return True
    schema = media.get("schema", {})
    alternatives = schema.get("anyOf") or schema.get("oneOf")
    if alternatives:
        return all(_has_example(spec, {"schema": s}) for s in alternatives)
    if schema.get("examples"):
        return True
    component = _component(spec, schema)
    if component is None:
        return False
    if component.get("examples"):
        return True
    items = component.get("properties", {}).get("data", {}).get("items")
    return items is not None and _has_example(spec, {"schema": items})


def test_every_schema_property_has_a_description(spec: dict[str, Any]) -> None:
    missing = [
        where
        for name, schema in spec["components"]["schemas"].items()
        for where, prop in _properties(name, schema)
        if not prop.get("description", "").strip()
    ]
    assert not missing, f"{len(missing)} properties without a description:\n" + "\n".join(missing)


def test_every_parameter_has_a_description(spec: dict[str, Any]) -> None:
    missing = [
        f"{op_name} {param['in']} {param['name']}"
        for op_name, operation in _operations(spec)
        for param in operation.get("parameters", [])
        if not param.get("description", "").strip()
    ]
    assert not missing, "parameters without a description:\n" + "\n".join(missing)


def test_every_operation_has_a_summary_and_a_description(spec: dict[str, Any]) -> None:
    missing = [
        f"{name} ({what})"
        for name, operation in _operations(spec)
        for what in ("summary", "description")
        if not operation.get(what, "").strip()
    ]
    assert not missing, "operations without a summary or description:\n" + "\n".join(missing)


def test_descriptions_are_plain_prose(spec: dict[str, Any]) -> None:
    texts: list[tuple[str, str]] = [("info", spec["info"].get("description", ""))]
    for name, operation in _operations(spec):
        texts.append((name, operation.get("description", "")))
        texts += [
            (f"{name} {p['name']}", p.get("description", ""))
            for p in operation.get("parameters", [])
        ]
    for name, schema in spec["components"]["schemas"].items():
        texts.append((name, schema.get("description", "")))
        texts += [(where, prop.get("description", "")) for where, prop in _properties(name, schema)]
    marked = [f"{where}: {text!r}" for where, text in texts if RST.search(text)]
    assert not marked, "reStructuredText markup in descriptions:\n" + "\n".join(marked)


def test_every_json_request_body_has_an_example(spec: dict[str, Any]) -> None:
    missing = [
        name
        for name, operation in _operations(spec)
        if "application/json" in operation.get("requestBody", {}).get("content", {})
        and not _has_example(spec, operation["requestBody"]["content"]["application/json"])
    ]
    assert not missing, "JSON request bodies without an example:\n" + "\n".join(missing)


def test_every_json_answer_has_an_example(spec: dict[str, Any]) -> None:
    missing = [
        name
        for name, operation in _operations(spec)
        for status, answer in operation["responses"].items()
        if status.startswith("2")
        for media_type, media in answer.get("content", {}).items()
        if media_type == "application/json" and not _has_example(spec, media)
    ]
    assert not missing, "JSON answers without an example:\n" + "\n".join(missing)


def _models(cls: type[BaseModel]) -> Iterator[type[BaseModel]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _models(sub)


def test_examples_are_valid_values_of_their_models(spec: dict[str, Any]) -> None:
    # Examples are written by hand next to the fields; a renamed or retyped field must not
    # leave them behind.
    checked = 0
    for model in set(_models(BaseModel)):
        if not model.__module__.startswith("service."):
            continue
        extra = model.model_config.get("json_schema_extra")
        for example in extra.get("examples", []) if isinstance(extra, dict) else []:
            model.model_validate(example)
            checked += 1
    assert checked >= 20, checked


def test_errors_are_documented_in_the_shape_they_have(
    spec: dict[str, Any], docs_client: TestClient
) -> None:
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    answer = spec["paths"]["/v1/fine_tuning/jobs"]["post"]["responses"]["422"]
    error = _component(spec, answer["content"]["application/json"]["schema"])
    assert error is not None and set(error["properties"]) == {"error"}
    detail = _component(spec, error["properties"]["error"])
    assert detail is not None
    # What the server really answers has exactly the documented fields.
    resp = docs_client.post("/v1/tenants", json={})
    assert set(resp.json()) == {"error"}
    assert set(resp.json()["error"]) == set(detail["properties"])


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_load_only_files_this_server_serves(docs_client: TestClient, page: str) -> None:
    resp = docs_client.get(page)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    html = resp.text
    assert not re.search(r"(?:src|href)\s*=\s*[\"'](?:https?:)?//", html), html
    assets = re.findall(r"(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", html)
    assert any(a.endswith(".js") for a in assets), assets
    for asset in assets:
        got = docs_client.get(asset)
        assert got.status_code == 200, asset
        if asset.endswith(".js"):
            assert "javascript" in got.headers["content-type"], asset
            assert len(got.content) > 500_000, asset  # the real bundle, not a stub
        elif asset.endswith(".css"):
            assert got.headers["content-type"].startswith("text/css"), asset
    assert "/openapi.json" in html


def test_docs_assets_come_from_the_installed_package(docs_client: TestClient) -> None:
    from service.api.routes.docs import ASSETS_DIR

    assert ASSETS_DIR.is_dir()
    served = docs_client.get("/docs/assets/swagger-ui-bundle.js").content
    assert served == (Path(ASSETS_DIR) / "swagger-ui-bundle.js").read_bytes()
    assert docs_client.get("/docs/assets/no-such-file.js").status_code == 404
