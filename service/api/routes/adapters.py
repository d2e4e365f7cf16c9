"""``/v1/adapters``: list, get, delete metadata; export and import weights as zip archives.

Export: ``GET /v1/adapters/{name}/export?format=peft|loraplex``. ``peft`` is PEFT's folder
(``adapter_config.json``, ``adapter_model.safetensors``, plus ``loraplex_head.safetensors``),
for LoRA and an encoder's prompt tuning; ``loraplex`` is our stored config JSON and
safetensors, for every method. The default is ``peft`` where it exists, else ``loraplex``.

Import: ``POST /v1/adapters/import`` (multipart ``file`` = zip of either format, ``name``;
``task`` + ``label_names`` for PEFT adapters that carry no loraplex head; a decoder's LoRA
without one is a ``chat`` adapter). The body may be ``max_import_mb``, not ``max_upload_mb``:
an export of the largest adapter trained here must import back. Archives are read
defensively (``service.adapters.archive``) and the adapter is stored like a trained one.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from service.adapters.archive import PEFT_METHODS, read_archive, write_archive
from service.adapters.imports import archive_limits, insert, load, precheck
from service.adapters.records import delete_adapter_row, find_adapter_row
from service.adapters.transfer import (
    HeadSpec,
    default_export_format,
    export_files,
    recorded_base,
)
from service.api.deps import (
    AdapterCachesDep,
    CurrentTenant,
    LongRequestTenantId,
    SessionDep,
    SessionFactoryDep,
    SettingsDep,
)
from service.api.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, keyset_page
from service.api.params import AdapterNamePath
from service.api.schemas.adapters import ADAPTER_EXAMPLE, AdapterObject
from service.api.schemas.common import NAME_PATTERN, DeletedResponse, ListResponse
from service.api.uploads import form_text, read_upload, require_multipart
from service.bases import adapter_base, base_specs, resolve_job_base
from service.config import Settings
from service.db.models import AdapterRow
from service.errors import invalid, not_found
from service.state import app_state

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])

_NAME_RE = re.compile(NAME_PATTERN)
_TASKS = ("classification", "reward", "chat")
_MAX_NAME = 64

_IMPORT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "name"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "A zip of a PEFT adapter folder (safetensors only) "
                            "or of a loraplex export, at most LORAPLEX_MAX_IMPORT_MB.",
                        },
                        "name": {
                            "type": "string",
                            "maxLength": _MAX_NAME,
                            "description": "The adapter's name, unique per tenant: letters, "
                            "digits, '.', '_' and '-', starting with a letter or digit.",
                        },
                        "task": {
                            "type": "string",
                            "enum": list(_TASKS),
                            "description": "For PEFT adapters without a loraplex head: the "
                            "new (untrained) head's task, or `chat` for a decoder's LoRA "
                            "(the decoder's own language-model head; the default there).",
                        },
                        "label_names": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "Repeat the field, or send one JSON array or a "
                            "comma-separated list.",
                        },
                        "text_pair": {
                            "type": "boolean",
                            "description": "For PEFT adapters without a loraplex head: whether "
                            "the new head reads text pairs. Default: false.",
                        },
                        "model": {
                            "type": "string",
                            "description": "The base the adapter belongs to, by its id in "
                            "/v1/models (a decoder's chat adapter: the decoder). Default: the "
                            "base the archive names, where it is one of these (a loraplex or "
                            "PEFT export of this service names its own), else the encoder. An "
                            "adapter of another base is refused (422 base_model_mismatch).",
                        },
                    },
                }
            }
        },
    }
}


class AdapterDeleted(DeletedResponse):
    """What deleting an adapter answers."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": ADAPTER_EXAMPLE["id"],
                    "object": "adapter",
                    "deleted": True,
                    "name": ADAPTER_EXAMPLE["name"],
                    "version": ADAPTER_EXAMPLE["version"],
                }
            ]
        }
    )

    name: str = Field(description="The deleted adapter's name, free to be used again.")
    version: int = Field(description="The deleted adapter's version (never reused).")


def _get_owned(session: Session, tenant_id: str, name: str, *, weights: bool = False) -> AdapterRow:
    row = find_adapter_row(session, tenant_id, name, weights=weights)
    if row is None:
        raise not_found("adapter", name)
    return row


@router.get("", response_model=ListResponse[AdapterObject], summary="List adapters")
def list_adapters(
    session: SessionDep,
    tenant: CurrentTenant,
    after: AfterQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> ListResponse[AdapterObject]:
    """The caller's adapters, newest first, one page at a time; `after` takes the name of
    the last adapter of the previous page."""
    rows, has_more = keyset_page(
        session,
        AdapterRow,
        [AdapterRow.tenant_id == tenant.id],
        after=after,
        limit=limit,
        cursor_column=AdapterRow.name,
    )
    data = [AdapterObject.from_row(r) for r in rows]
    return ListResponse.page(data, has_more, lambda a: a.name)


# --- import ----------------------------------------------------------------------------------


def _label_names(form: FormData) -> list[str]:
    """Repeated ``label_names`` fields, or one JSON array, or one comma-separated list."""
    values = [v for v in form.getlist("label_names") if v != ""]
    if any(not isinstance(v, str) for v in values):
        raise invalid("label_names must be text fields.", "label_names")
    texts: list[str] = [v for v in values if isinstance(v, str)]
    if len(texts) != 1:
        return texts
    only = texts[0].strip()
    if only.startswith("["):
        try:
            parsed = json.loads(only)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            parsed = None
        if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
            raise invalid("label_names must be a JSON array of strings.", "label_names")
        return parsed
    return [part.strip() for part in only.split(",") if part.strip()]


def _head_spec(form: FormData) -> HeadSpec | None:
    task = form_text(form.get("task"), "task", 32)
    labels = _label_names(form)
    pair_field = form_text(form.get("text_pair"), "text_pair", 8)
    if task is None:
        if labels or pair_field is not None:
            raise invalid(
                "label_names and text_pair need a task (classification or reward).",
                "task",
                "missing_task",
            )
        return None
    if task not in _TASKS:
        raise invalid(f"task must be one of {', '.join(_TASKS)}; got {task!r}.", "task")
    pair = (pair_field or "false").lower()
    if pair not in ("true", "false", "1", "0"):
        raise invalid("text_pair must be true or false.", "text_pair")
    return HeadSpec(task=task, label_names=labels, text_pair=pair in ("true", "1"))


def _import_name(form: FormData) -> str:
    name = form_text(form.get("name"), "name", _MAX_NAME)
    if name is None:
        raise invalid("A name for the adapter is required.", "name", "missing_name")
    if not _NAME_RE.match(name):
        raise invalid(
            "name may hold letters, digits, '.', '_' and '-', and must start with a letter "
            "or digit.",
            "name",
        )
    return name


@router.post(
    "/import",
    response_model=AdapterObject,
    summary="Import an adapter",
    openapi_extra=_IMPORT_OPENAPI,
)
async def import_adapter(
    request: Request,
    tenant_id: LongRequestTenantId,
    settings: SettingsDep,
    factory: SessionFactoryDep,
) -> AdapterObject:
    """Stores an uploaded adapter under `name`, as if it had been trained here: a zip of a
    PEFT folder (LoRA or prompt tuning, safetensors only) or of a loraplex export. A PEFT
    adapter without a loraplex head gets a new, untrained head from `task` and `label_names`;
    a decoder's LoRA without one is a `chat` adapter. The archive is read defensively and
    checked against the base model before anything is stored."""
    require_multipart(request, "adapter", "file, name")
    async with request.form(max_files=1, max_fields=64) as form:
        name = _import_name(form)
        head = _head_spec(form)
        form_model = form_text(form.get("model"), "model", _MAX_NAME)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise invalid("A zip archive is required in the 'file' field.", "file", "missing_file")
        data = await read_upload(upload, settings.max_import_bytes)
    files = await run_in_threadpool(read_archive, data, archive_limits(settings))
    spec = resolve_job_base(settings, form_model or _configured(settings, recorded_base(files)))
    base = app_state(request).require_base(spec.name)
    await run_in_threadpool(precheck, factory, tenant_id, name, settings)
    row = await run_in_threadpool(load, files, name, base, head)
    row = await run_in_threadpool(insert, factory, tenant_id, row, settings)
    return AdapterObject.from_row(row)


def _configured(settings: Settings, name: str | None) -> str | None:
    """``name`` where it is a base this deployment configures, else None: an archive's own
    export names its base, so it imports back without ``model``; a path or another model's
    name leaves the choice to the default (the encoder), whose check then refuses it."""
    return name if name is not None and name in base_specs(settings) else None


# --- one adapter -----------------------------------------------------------------------------


@router.get("/{name}", response_model=AdapterObject, summary="Get an adapter")
def get_adapter(name: AdapterNamePath, session: SessionDep, tenant: CurrentTenant) -> AdapterObject:
    """An adapter's metadata: method, task, labels, size and metrics (never its weights)."""
    return AdapterObject.from_row(_get_owned(session, tenant.id, name))


@router.get(
    "/{name}/export",
    response_class=Response,
    summary="Export an adapter",
    responses={200: {"content": {"application/zip": {}}, "description": "A zip archive"}},
)
def export_adapter(
    name: AdapterNamePath,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    format: Annotated[
        Literal["peft", "loraplex"] | None,
        Query(
            description="Default: peft where PEFT has the adapter's layout (lora; "
            "prompt_tuning on the encoder), loraplex otherwise."
        ),
    ] = None,
) -> Response:
    """The adapter's weights as a zip: `peft` is PEFT's folder (`adapter_config.json`,
    `adapter_model.safetensors`, plus `loraplex_head.safetensors`) for LoRA and an encoder's
    prompt tuning; `loraplex` is the stored config and safetensors, for every method, and
    imports back as it was."""
    row = _get_owned(session, tenant.id, name, weights=True)
    base = None
    if format != "loraplex" and row.method in PEFT_METHODS:  # PEFT's layout names its modules
        bases = app_state(request).require_bases()
        base = adapter_base(bases, row.base_model, row.base_fingerprint, "name")
    fmt = format or default_export_format(row, base)
    files = export_files(row, fmt, base)
    filename = f"{row.name}-v{row.version}-{fmt}.zip"
    return Response(
        write_archive(files),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.delete("/{name}", response_model=AdapterDeleted, summary="Delete an adapter")
def delete_adapter(
    name: AdapterNamePath, session: SessionDep, tenant: CurrentTenant, caches: AdapterCachesDep
) -> AdapterDeleted:
    """Deletes the adapter; it stops being served at once. A new adapter may take the name
    again: it gets a new version, so no cached copy of the old one can answer for it."""
    row = _get_owned(session, tenant.id, name)
    deleted = AdapterDeleted(id=row.id, object="adapter", name=row.name, version=row.version)
    if not delete_adapter_row(session, row, caches):
        raise not_found("adapter", name)
    return deleted
