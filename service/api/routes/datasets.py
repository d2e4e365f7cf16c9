"""``/v1/datasets``: upload (multipart file or JSON records), list, get, delete, and the dry run
``POST /v1/datasets/validate`` (the same checks, every problem listed, nothing stored)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.api.deps import (
    CurrentTenant,
    LongRequestTenantId,
    SessionDep,
    SessionFactoryDep,
    SettingsDep,
)
from service.api.errors import media_type
from service.api.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, keyset_page
from service.api.params import DatasetId
from service.api.schemas.common import DeletedResponse, ListResponse
from service.api.schemas.datasets import KIND, DatasetCreateJSON, DatasetObject, DatasetValidation
from service.api.uploads import (
    DATASET_KINDS,
    SpooledBody,
    dataset_kind,
    dataset_upload_body,
    form_text,
    read_upload,
    upload_name,
)
from service.datasets.infer import infer_kind
from service.datasets.reading import MAX_NAME_CHARS, DatasetFormat, detect_format
from service.datasets.rows import DatasetError, DatasetKind, Limits
from service.datasets.store import (
    UploadDigest,
    delete_owned_dataset,
    get_owned_dataset,
    store_dataset,
)
from service.datasets.validation import (
    MAX_PROBLEMS,
    check_file,
    check_json_body,
    parse_file,
    parse_json_body,
)
from service.db.models import Dataset
from service.errors import invalid, unsupported_media_type

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

T = TypeVar("T")

_NAME_FIELD = {
    "type": "string",
    "maxLength": MAX_NAME_CHARS,
    "description": "A name to show; default: the file's name.",
}
_FORMAT_FIELD = {
    "type": "string",
    "enum": [f.value for f in DatasetFormat],
    "description": "How to read the file; default: from its name, content type or first byte.",
}


def _body_openapi(kind_required: bool) -> dict[str, Any]:
    """Two bodies for one route (read by hand, streamed), so the request body is documented
    by hand; the JSON form is DatasetCreateJSON's schema."""
    kind_field = {"type": "string", "enum": DATASET_KINDS, "description": KIND}
    if not kind_required:
        kind_field["description"] = f"Optional: inferred from the first row when absent. {KIND}"
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": dataset_upload_body(
                    ["kind"] if kind_required else [],
                    {"kind": kind_field, "name": _NAME_FIELD, "format": _FORMAT_FIELD},
                ),
                "application/json": {
                    "schema": DatasetCreateJSON.model_json_schema(
                        ref_template="#/components/schemas/{model}"
                    )
                },
            },
        }
    }


@dataclass(frozen=True)
class _Upload:
    """A dataset file as sent in a multipart form, read but not yet checked."""

    kind: DatasetKind | None
    fmt: DatasetFormat
    data: bytes
    name: str | None


async def _read_multipart(request: Request, max_bytes: int, *, kind_required: bool) -> _Upload:
    # Starlette spools file parts to disk past 1 MB; the middleware has already bounded the
    # whole body, so nothing here can grow without limit.
    async with request.form(max_files=1, max_fields=8) as form:
        kind_field = form.get("kind")
        kind = dataset_kind(kind_field) if kind_required or kind_field not in (None, "") else None
        name = form_text(form.get("name"), "name")
        fmt_field = form_text(form.get("format"), "format", 16)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise invalid("A dataset file is required in the 'file' field.", "file", "missing_file")
        name = name or upload_name(upload)
        data = await read_upload(upload, max_bytes)
        filename, content_type = upload.filename, upload.content_type
    if fmt_field is not None:
        if fmt_field not in {f.value for f in DatasetFormat}:
            raise invalid(f"format must be jsonl or csv; got {fmt_field!r}.", "format")
        fmt = DatasetFormat(fmt_field)
    else:
        fmt = detect_format(filename, content_type, data)
    return _Upload(kind=kind, fmt=fmt, data=data, name=name)


async def _read_json(
    request: Request, read: Callable[[Iterable[bytes], Limits], T], limits: Limits
) -> tuple[T, UploadDigest]:
    """``read``'s answer on a JSON upload, received on the event loop (no thread waits on the
    client) and parsed in a worker thread: rows are kept, not the body's parsed objects."""
    body = await SpooledBody.receive(request)
    try:
        answer = await run_in_threadpool(read, body, limits)
    finally:
        await body.aclose()
    return answer, body.digest()


def _media_type(request: Request) -> str:
    """multipart/form-data or application/json; 415 for anything else."""
    content_type = media_type(request)
    if content_type not in ("multipart/form-data", "application/json"):
        raise unsupported_media_type(
            "Send the dataset as multipart/form-data (file, kind) or application/json "
            "(kind, records)."
        )
    return content_type


@router.post(
    "",
    response_model=DatasetObject,
    summary="Upload a dataset",
    openapi_extra=_body_openapi(kind_required=True),
)
async def create_dataset(
    request: Request,
    tenant_id: LongRequestTenantId,
    settings: SettingsDep,
    factory: SessionFactoryDep,
) -> DatasetObject:
    """Upload a dataset: a multipart `file` with its `kind` (and optional `name`), or JSON
    `records`. The rows are checked whole before anything is stored; the first problem is
    answered as a 422 naming the line (or record) and field. `POST /v1/datasets/validate`
    lists every problem instead."""
    limits = Limits(max_rows=settings.max_dataset_rows)
    if _media_type(request) == "multipart/form-data":
        upload = await _read_multipart(request, settings.max_upload_bytes, kind_required=True)
        assert upload.kind is not None
        parsed = await run_in_threadpool(parse_file, upload.data, upload.kind, upload.fmt, limits)
        received, name = UploadDigest.of(upload.data), upload.name
    else:
        (parsed, name), received = await _read_json(request, parse_json_body, limits)
    row = await run_in_threadpool(
        store_dataset,
        factory,
        tenant_id,
        name,
        parsed,
        received,
        settings.max_dataset_bytes_per_tenant,
    )
    return DatasetObject.from_row(row)


def _check_upload(upload: _Upload, limits: Limits) -> DatasetValidation:
    try:
        kind = upload.kind or infer_kind(upload.data, upload.fmt)
    except DatasetError as exc:
        return DatasetValidation.refused(exc, None, upload.fmt)
    return DatasetValidation.from_report(
        check_file(upload.data, kind, upload.fmt, limits), upload.fmt
    )


@router.post(
    "/validate",
    response_model=DatasetValidation,
    summary="Check a dataset without storing it",
    description=f"Dry run of an upload: the same body and the same checks as `POST "
    f"/v1/datasets`, but nothing is stored and every problem is listed (up to {MAX_PROBLEMS}, "
    "in file order) instead of the first. Answers 200 with `valid: false` and the problems "
    "for a bad dataset; a malformed request (no file, an unknown kind, too large) is refused "
    "as the upload would refuse it. Without a `kind`, the one the first row calls for is "
    "checked.",
    openapi_extra=_body_openapi(kind_required=False),
)
async def validate_dataset(
    request: Request, _tenant_id: LongRequestTenantId, settings: SettingsDep
) -> DatasetValidation:
    limits = Limits(max_rows=settings.max_dataset_rows)
    if _media_type(request) == "multipart/form-data":
        upload = await _read_multipart(request, settings.max_upload_bytes, kind_required=False)
        return await run_in_threadpool(_check_upload, upload, limits)
    report, _ = await _read_json(request, check_json_body, limits)
    return DatasetValidation.from_report(report, None)


@router.get("", response_model=ListResponse[DatasetObject], summary="List datasets")
def list_datasets(
    session: SessionDep,
    tenant: CurrentTenant,
    after: AfterQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> ListResponse[DatasetObject]:
    """The caller's datasets, newest first, one page at a time."""
    rows, has_more = keyset_page(
        session, Dataset, [Dataset.tenant_id == tenant.id], after=after, limit=limit
    )
    data = [DatasetObject.from_row(r) for r in rows]
    return ListResponse.page(data, has_more)


@router.get("/{dataset_id}", response_model=DatasetObject, summary="Get a dataset")
def get_dataset(dataset_id: DatasetId, session: SessionDep, tenant: CurrentTenant) -> DatasetObject:
    """A dataset's kind, size and label counts; its rows are at `GET /v1/files/{id}/content`."""
    return DatasetObject.from_row(get_owned_dataset(session, tenant.id, dataset_id))


@router.delete("/{dataset_id}", response_model=DeletedResponse, summary="Delete a dataset")
def delete_dataset(
    dataset_id: DatasetId, session: SessionDep, tenant: CurrentTenant
) -> DeletedResponse:
    """Deletes the dataset and its rows; 409 while a job that has not finished uses it."""
    delete_owned_dataset(session, get_owned_dataset(session, tenant.id, dataset_id))
    return DeletedResponse(id=dataset_id, object="dataset")
