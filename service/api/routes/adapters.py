"""``/v1/adapters``: list, get, delete metadata; export and import weights as zip archives.

Export: ``GET /v1/adapters/{name}/export?format=peft|loraplex``. ``peft`` is PEFT's folder
(``adapter_config.json``, ``adapter_model.safetensors``, plus ``loraplex_head.safetensors``),
for LoRA and prompt tuning; ``loraplex`` is our stored config JSON and safetensors, for every
method. The default is ``peft`` where it exists, else ``loraplex``.

Import: ``POST /v1/adapters/import`` (multipart ``file`` = zip of either format, ``name``;
``task`` + ``label_names`` for PEFT adapters that carry no loraplex head). Archives are read
defensively (``service.adapters.archive``) and the adapter is stored like a trained one.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker, undefer
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from service.adapters.archive import (
    PEFT_METHODS,
    ArchiveLimits,
    read_archive,
    write_archive,
)
from service.adapters.quota import check_adapter_quota, name_taken
from service.adapters.store import adapter_row_from
from service.adapters.transfer import HeadSpec, export_files, import_files
from service.api.deps import (
    CurrentTenant,
    SessionDep,
    SessionFactoryDep,
    SettingsDep,
    get_base_model,
)
from service.api.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, keyset_page
from service.api.schemas.adapters import AdapterObject
from service.api.schemas.common import NAME_PATTERN, DeletedResponse, ListResponse
from service.api.uploads import form_text, read_upload, require_multipart
from service.config import Settings
from service.db.models import Adapter
from service.errors import conflict, invalid, not_found
from service.jobs.queue import active_job_count, next_adapter_version

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])

_NAME_RE = re.compile(NAME_PATTERN)
_TASKS = ("classification", "reward")
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
                            "or of a loraplex export.",
                        },
                        "name": {"type": "string", "maxLength": _MAX_NAME},
                        "task": {
                            "type": "string",
                            "enum": list(_TASKS),
                            "description": "For PEFT adapters without a loraplex head: the "
                            "new (untrained) head's task.",
                        },
                        "label_names": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "Repeat the field, or send one JSON array or a "
                            "comma-separated list.",
                        },
                        "text_pair": {"type": "boolean"},
                    },
                }
            }
        },
    }
}


class AdapterDeleted(DeletedResponse):
    name: str
    version: int


def _get_owned(session: Session, tenant_id: str, name: str, *, weights: bool = False) -> Adapter:
    # Adapter.weights is deferred: metadata queries never read the blob.
    stmt = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
    if weights:
        stmt = stmt.options(undefer(Adapter.weights))
    row = session.scalar(stmt)
    if row is None:
        raise not_found("adapter", name)
    return row


def delete_adapter_row(request: Request, session: Session, row: Adapter) -> None:
    """Delete and commit; its lookup-cache entries and resident copies are dropped too.

    Shared with ``DELETE /v1/models/{id}``. Serving caches key on (tenant, name, version) and
    versions are never reused, so even before the drop a cached copy cannot be served for a
    later adapter of the same name; the drop frees its memory.
    """
    tenant_id, name = row.tenant_id, row.name
    session.delete(row)
    session.commit()
    lookups = request.app.state.lookup_cache
    if lookups is not None:
        lookups.drop_adapter(tenant_id, name)
    batcher = getattr(request.app.state, "batcher", None)
    if batcher is not None:
        batcher.invalidate(tenant_id, name)


@router.get("", response_model=ListResponse[AdapterObject])
def list_adapters(
    session: SessionDep,
    tenant: CurrentTenant,
    after: AfterQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> ListResponse[AdapterObject]:
    """Newest first; ``after`` is the name of the last adapter of the previous page."""
    rows, has_more = keyset_page(
        session,
        Adapter,
        [Adapter.tenant_id == tenant.id],
        after=after,
        limit=limit,
        cursor_column=Adapter.name,
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
        raise invalid(f"task must be classification or reward; got {task!r}.", "task")
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


def _check_room(session: Session, tenant_id: str, name: str, settings: Settings) -> None:
    reason = name_taken(session, tenant_id, name)
    if reason:
        raise conflict(reason, "name", "adapter_name_taken")
    check_adapter_quota(
        session, tenant_id, settings.max_adapters_per_tenant, active_job_count(session, tenant_id)
    )


def _precheck(
    factory: sessionmaker[Session], tenant_id: str, name: str, settings: Settings
) -> None:
    # Before the expensive part (unzip, build on the base): fail fast on name and quota.
    with factory() as session:
        _check_room(session, tenant_id, name, settings)


def _insert(
    factory: sessionmaker[Session], tenant_id: str, row: Adapter, settings: Settings
) -> Adapter:
    with factory() as session:
        try:
            # Checked again in the inserting transaction: others may have raced us meanwhile.
            _check_room(session, tenant_id, row.name, settings)
            row.tenant_id = tenant_id
            row.version = next_adapter_version(session, tenant_id)
            session.add(row)
            session.commit()
        except IntegrityError:
            session.rollback()
            raise conflict(
                f"An adapter named '{row.name}' already exists.", "name", "adapter_name_taken"
            ) from None
        except BaseException:
            session.rollback()
            raise
        session.refresh(row)
        session.expunge(row)
    return row


def _archive_limits(settings: Settings) -> ArchiveLimits:
    # Unpacked, an adapter is at most a little more than it is packed (weights barely
    # compress); twice the upload limit leaves room for that and for JSON.
    cap = 2 * settings.max_upload_bytes
    return ArchiveLimits(max_member_bytes=cap, max_total_bytes=cap)


def _load(
    data: bytes, name: str, base: Any, head: HeadSpec | None, limits: ArchiveLimits
) -> Adapter:
    """Unzip, import and serialise: the blocking, torch-bound part (run in a thread)."""
    adapter = import_files(read_archive(data, limits), base, head)
    return adapter_row_from(adapter, base, name=name)


@router.post("/import", response_model=AdapterObject, openapi_extra=_IMPORT_OPENAPI)
async def import_adapter(
    request: Request, tenant: CurrentTenant, settings: SettingsDep, factory: SessionFactoryDep
) -> AdapterObject:
    """Store an uploaded PEFT (LoRA, prompt tuning) or loraplex adapter under ``name``."""
    require_multipart(request, "adapter", "file, name")
    async with request.form(max_files=1, max_fields=64) as form:
        name = _import_name(form)
        head = _head_spec(form)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise invalid("A zip archive is required in the 'file' field.", "file", "missing_file")
        data = await read_upload(upload, settings.max_upload_bytes)
    base = get_base_model(request)
    await run_in_threadpool(_precheck, factory, tenant.id, name, settings)
    row = await run_in_threadpool(_load, data, name, base, head, _archive_limits(settings))
    row = await run_in_threadpool(_insert, factory, tenant.id, row, settings)
    return AdapterObject.from_row(row)


# --- one adapter -----------------------------------------------------------------------------


@router.get("/{name}", response_model=AdapterObject)
def get_adapter(name: str, session: SessionDep, tenant: CurrentTenant) -> AdapterObject:
    return AdapterObject.from_row(_get_owned(session, tenant.id, name))


@router.get(
    "/{name}/export",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}, "description": "A zip archive"}},
)
def export_adapter(
    name: str,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    format: Annotated[
        Literal["peft", "loraplex"] | None,
        Query(description="Default: peft for lora and prompt_tuning, loraplex otherwise."),
    ] = None,
) -> Response:
    row = _get_owned(session, tenant.id, name, weights=True)
    fmt = format or ("peft" if row.method in PEFT_METHODS else "loraplex")
    base = get_base_model(request) if fmt == "peft" and row.method in PEFT_METHODS else None
    files = export_files(row, fmt, base)
    filename = f"{row.name}-v{row.version}-{fmt}.zip"
    return Response(
        write_archive(files),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.delete("/{name}", response_model=AdapterDeleted)
def delete_adapter(
    name: str, request: Request, session: SessionDep, tenant: CurrentTenant
) -> AdapterDeleted:
    """Delete an adapter. Serving caches key on (tenant, name, version) and versions are never
    reused, so a cached copy can never be mistaken for a later adapter of the same name."""
    row = _get_owned(session, tenant.id, name)
    deleted = AdapterDeleted(id=row.id, object="adapter", name=row.name, version=row.version)
    delete_adapter_row(request, session, row)
    return deleted
