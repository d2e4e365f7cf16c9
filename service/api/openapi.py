"""What ``/openapi.json`` cannot learn from the routes themselves, added in one place.

FastAPI documents a route's 200 and, where it validates parameters or a JSON body, a 422. The
other answers come from the auth dependencies, the body limits, the error handlers
(:mod:`service.api.errors`) and the domain code, so :func:`install_openapi` adds them to each
operation from what the operation is: one that takes a key can answer 401, 403 (all but
:data:`_ANY_KEY`'s) and 503 when the database it looks the key up in is busy or unreachable; a
path id 404; a body 413 and 422, a multipart one 415; the rest (409 for names and states, 429
for quotas, ...) from :data:`_ALSO`. Each is documented as :class:`ErrorResponse` with its
headers and an example.

FastAPI also encodes the whole document with ``exclude_none``, which drops the nulls inside
hand-written examples (fastapi/fastapi#5559): an example's required nullable field went
missing, and the example failed its own schema. :func:`_restore_nulls` puts them back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from service.api.errors import RENDERING, error_body
from service.api.schemas.common import ErrorResponse

_SCHEMAS = "#/components/schemas/"
_FASTAPI_422 = f"{_SCHEMAS}HTTPValidationError"
_MULTIPART = "multipart/form-data"


@dataclass(frozen=True)
class _ErrorAnswer:
    description: str
    # An example error: (message, param, code).
    example: tuple[str, str | None, str]


_ANSWERS: Mapping[int, _ErrorAnswer] = {
    400: _ErrorAnswer(
        "A well-formed request for something loraplex does not offer (an OpenAI parameter it "
        "lacks, a model that does not generate text): `code` says which.",
        (
            "integrations is not supported by loraplex; leave it out.",
            "integrations",
            "unsupported_parameter",
        ),
    ),
    401: _ErrorAnswer(
        "No API key, or one that is unknown or revoked (`missing_api_key`, `invalid_api_key`, "
        "`revoked_api_key`).",
        ("Incorrect API key provided.", None, "invalid_api_key"),
    ),
    403: _ErrorAnswer(
        "The key may not do this: a tenant key on an admin route (`admin_required`), the "
        "admin key on a tenant's (`tenant_key_required`); the base model may not be deleted "
        "(`base_model_not_deletable`).",
        ("This endpoint needs an admin key.", None, "admin_required"),
    ),
    404: _ErrorAnswer(
        "No such object for this key (another tenant's objects are never confirmed to "
        "exist); `param` names the request field that named it, if one did.",
        ("No adapter found with id 'sentiment'.", None, "adapter_not_found"),
    ),
    409: _ErrorAnswer(
        "The object's state forbids this: a name already taken, an object an unfinished job "
        "uses, a job already finished, an adapter this server cannot serve. Retrying will not "
        "help (`x-should-retry: false`).",
        ("An adapter named 'sentiment' already exists.", "name", "adapter_name_taken"),
    ),
    413: _ErrorAnswer(
        "The body, a file or a value in it is larger than this route takes "
        "(`request_too_large`, `value_too_large`).",
        ("Request body is larger than the 1 MB limit.", None, "request_too_large"),
    ),
    415: _ErrorAnswer(
        "The body is in a format this route does not read (`unsupported_media_type`).",
        ("Send the file as multipart/form-data (file, purpose).", None, "unsupported_media_type"),
    ),
    422: _ErrorAnswer(
        "A value is missing or invalid: `param` names the field, `message` says why.",
        ("A file is required in the 'file' field.", "file", "missing_file"),
    ),
    429: _ErrorAnswer(
        "A tenant quota is reached (`code` names it); retrying will not help until something "
        "finishes or is deleted (`x-should-retry: false`).",
        (
            "This tenant already has 4 queued or running jobs (limit 4); wait for one to finish.",
            None,
            "concurrent_jobs_limit",
        ),
    ),
    503: _ErrorAnswer(
        "Retry shortly (after `Retry-After` seconds where sent): the database is busy or "
        "unreachable (`database_busy`, `database_unavailable`), the base models are still "
        "loading (`model_not_ready`), or a queue is full (`queue_full`).",
        ("The database is unreachable; retry shortly.", None, "database_unavailable"),
    ),
}

# Keyed operations that any valid key may call, admin or tenant: they never answer 403. Every
# other keyed one refuses one kind of key (tests/service/api/test_openapi_answers.py asks each
# with both).
_ANY_KEY = frozenset({("get", "/v1/methods")})
# The answers an operation's shape does not show: the names and states it checks (409), the
# objects its body or query names (404), its quotas (429), the features it refuses (400).
_ALSO: Mapping[tuple[str, str], frozenset[int]] = {
    ("post", "/v1/tenants"): frozenset({409}),
    ("post", "/v1/datasets"): frozenset({429}),
    ("delete", "/v1/datasets/{dataset_id}"): frozenset({409}),
    ("post", "/v1/files"): frozenset({400, 429}),
    ("delete", "/v1/files/{file_id}"): frozenset({409}),
    ("post", "/v1/fine_tuning/jobs"): frozenset({400, 404, 409, 429}),
    ("post", "/v1/fine_tuning/jobs/{job_id}/cancel"): frozenset({409}),
    ("post", "/v1/adapters/import"): frozenset({404, 409, 429}),
    ("delete", "/v1/adapters/{name}"): frozenset({409}),
    ("delete", "/v1/models/{model_id}"): frozenset({409}),
    # 409: an adapter stored in a form this server cannot load, or larger than its cache.
    ("post", "/predict"): frozenset({400, 404, 409}),
    ("post", "/reward/compare"): frozenset({400, 404, 409}),
    ("post", "/v1/chat/completions"): frozenset({400, 404, 409}),  # its reward_adapter
    ("post", "/v1/completions"): frozenset({400, 404}),
}

_HEADER_DESCRIPTIONS = {
    "WWW-Authenticate": "`Bearer`: send the API key as `Authorization: Bearer <key>`.",
    "x-should-retry": "`false`: the same request will fail again (the OpenAI SDKs read it).",
    "Retry-After": "Seconds to wait before sending the request again.",
}


def install_openapi(app: FastAPI) -> None:
    """Complete the app's document (once, when first asked for)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _complete(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _complete(spec: dict[str, Any]) -> dict[str, Any]:
    """The error schema in place of FastAPI's, every operation's error answers, and the nulls
    back in every example."""
    _use_error_schema(spec)
    for path, item in spec.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            for status in sorted(_error_statuses(method, path, operation)):
                # What a route documents itself (the readiness probe's 503) stays as it is.
                responses.setdefault(str(status), _error_answer(status))
    _restore_nulls(spec)
    return spec


def _use_error_schema(spec: dict[str, Any]) -> None:
    """Point the 422 answers FastAPI documents at :class:`ErrorResponse`, its own
    ``HTTPValidationError`` (``{"detail": [...]}``) gone: this service answers every error in
    one shape."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    error = ErrorResponse.model_json_schema(ref_template=_SCHEMAS + "{model}")
    schemas.update(error.pop("$defs", {}))
    schemas[ErrorResponse.__name__] = error
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for item in spec.get("paths", {}).values():
        for operation in item.values():
            answer = operation.get("responses", {}).get("422")
            if answer is None:
                continue
            json = answer.get("content", {}).get("application/json", {})
            if json.get("schema", {}).get("$ref") == _FASTAPI_422:
                operation["responses"]["422"] = _error_answer(422)


def _error_statuses(method: str, path: str, operation: Mapping[str, Any]) -> set[int]:
    """The error statuses ``operation`` can answer, from its shape and :data:`_ALSO`."""
    statuses = set(_ALSO.get((method, path), ()))
    if operation.get("security"):
        # The key is looked up in the database, which every such route also reads.
        statuses |= {401, 503} if (method, path) in _ANY_KEY else {401, 403, 503}
    parameters = operation.get("parameters", [])
    if parameters:
        statuses.add(422)
    if any(parameter["in"] == "path" for parameter in parameters):
        statuses.add(404)
    body = operation.get("requestBody")
    if body is not None:
        statuses |= {413, 422}
        if _MULTIPART in body.get("content", {}):
            statuses.add(415)
    return statuses


def _error_answer(status: int) -> dict[str, Any]:
    answer = _ANSWERS[status]
    rendering = next(r for r in RENDERING.values() if r.status == status)
    headers = [*rendering.headers, *(["Retry-After"] if status == 503 else [])]
    message, param, code = answer.example
    documented: dict[str, Any] = {
        "description": answer.description,
        "content": {
            "application/json": {
                "schema": {"$ref": _SCHEMAS + ErrorResponse.__name__},
                "example": error_body(message, rendering.type, param, code),
            }
        },
    }
    if headers:
        documented["headers"] = {
            name: {"description": _HEADER_DESCRIPTIONS[name], "schema": {"type": "string"}}
            for name in headers
        }
    return documented


# --- examples --------------------------------------------------------------------------------


def _restore_nulls(spec: dict[str, Any]) -> None:
    """Give each example back the nulls FastAPI's encoding dropped: a required property that
    may be null and is missing was a null (the examples are checked against their models by
    the tests, so none goes missing otherwise)."""
    schemas: dict[str, Any] = spec.get("components", {}).get("schemas", {})

    def resolve(schema: Mapping[str, Any]) -> Mapping[str, Any]:
        ref = schema.get("$ref", "")
        return schemas.get(ref.removeprefix(_SCHEMAS), {}) if ref.startswith(_SCHEMAS) else schema

    def alternatives(schema: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
        schema = resolve(schema)
        yield schema
        for alternative in schema.get("anyOf", []) + schema.get("oneOf", []):
            yield from alternatives(alternative)

    def nullable(schema: Mapping[str, Any]) -> bool:
        types = [s.get("type") for s in alternatives(schema)]
        return any(t == "null" or (isinstance(t, list) and "null" in t) for t in types)

    def fill(value: Any, schema: Mapping[str, Any]) -> None:
        for alternative in alternatives(schema):
            if isinstance(value, dict) and "properties" in alternative:
                properties = alternative["properties"]
                for name in alternative.get("required", []):
                    if name not in value and nullable(properties.get(name, {})):
                        value[name] = None
                for name, item in value.items():
                    fill(item, properties.get(name, {}))
                return
            if isinstance(value, list) and isinstance(alternative.get("items"), dict):
                for item in value:
                    fill(item, alternative["items"])
                return

    for schema in schemas.values():
        for example in schema.get("examples", []):
            fill(example, schema)
    for item in spec.get("paths", {}).values():
        for operation in item.values():
            bodies = [operation.get("requestBody", {}), *operation.get("responses", {}).values()]
            for body in bodies:
                for media in body.get("content", {}).values():
                    if "example" in media and "schema" in media:
                        fill(media["example"], media["schema"])
