"""``/v1/datasets``: upload (multipart file or JSON records), list, get, delete."""

from __future__ import annotations

import hashlib
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service import ids
from service.api.deps import CurrentTenant, SessionDep, SessionFactoryDep, SettingsDep
from service.api.errors import (
    ApiError,
    conflict,
    invalid,
    not_found,
    too_large,
    validation_error_to_api_error,
)
from service.api.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, keyset_page
from service.api.schemas.common import DeletedResponse, ListResponse
from service.api.schemas.datasets import DatasetCreateJSON, DatasetObject
from service.datasets import codec
from service.datasets.validation import (
    DatasetError,
    DatasetFormat,
    DatasetKind,
    Limits,
    ParsedDataset,
    detect_format,
    parse_file,
    parse_records,
)
from service.db.models import ACTIVE_STATUSES, Dataset, Job

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_READ_CHUNK = 1024 * 1024
_KINDS = [k.value for k in DatasetKind]

# Two bodies for one route, so the request body is documented by hand.
_CREATE_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "kind"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "JSON Lines (.jsonl) or CSV with a header row.",
                        },
                        "kind": {"type": "string", "enum": _KINDS},
                        "name": {"type": "string", "maxLength": 256},
                        "format": {"type": "string", "enum": [f.value for f in DatasetFormat]},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["kind", "records"],
                    "properties": {
                        "kind": {"type": "string", "enum": _KINDS},
                        "name": {"type": "string", "maxLength": 256},
                        "records": {"type": "array", "items": {"type": "object"}},
                    },
                }
            },
        },
    }
}


def _kind(value: Any) -> DatasetKind:
    if not isinstance(value, str) or value not in _KINDS:
        raise invalid(
            f"kind must be one of {', '.join(_KINDS)}; got {value!r}.", "kind", "invalid_kind"
        )
    return DatasetKind(value)


def _form_text(value: Any, param: str, max_length: int = 256) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise invalid(f"{param} must be a text field.", param)
    if len(value) > max_length:
        raise invalid(f"{param} must be at most {max_length} characters.", param)
    return value


async def _read_upload(upload: UploadFile, limit: int) -> bytes:
    """The file's bytes, refusing (413) as soon as it passes ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise too_large(limit, "file")
        chunks.append(chunk)
    return b"".join(chunks)


def _dataset_error(exc: DatasetError) -> ApiError:
    return invalid(exc.message, exc.param, exc.code)


async def _from_multipart(
    request: Request, limits: Limits, max_bytes: int
) -> tuple[ParsedDataset, bytes, str | None]:
    # Starlette spools file parts to disk past 1 MB; the middleware has already bounded the
    # whole body, so nothing here can grow without limit.
    async with request.form(max_files=1, max_fields=8) as form:
        kind = _kind(form.get("kind"))
        name = _form_text(form.get("name"), "name")
        fmt_field = _form_text(form.get("format"), "format", 16)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise invalid("A dataset file is required in the 'file' field.", "file", "missing_file")
        data = await _read_upload(upload, max_bytes)
        filename, content_type = upload.filename, upload.content_type
    if fmt_field is not None:
        if fmt_field not in {f.value for f in DatasetFormat}:
            raise invalid(f"format must be jsonl or csv; got {fmt_field!r}.", "format")
        fmt = DatasetFormat(fmt_field)
    else:
        fmt = detect_format(filename, content_type, data)
    try:
        parsed = await run_in_threadpool(parse_file, data, kind, fmt, limits)
    except DatasetError as exc:
        raise _dataset_error(exc) from None
    return parsed, data, name or filename


async def _from_json(request: Request, limits: Limits) -> tuple[ParsedDataset, bytes, str | None]:
    body = await request.body()
    try:
        payload = DatasetCreateJSON.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error_to_api_error(exc.errors()) from None
    try:
        parsed = await run_in_threadpool(parse_records, payload.records, payload.kind, limits)
    except DatasetError as exc:
        raise _dataset_error(exc) from None
    return parsed, body, payload.name


def _store(
    factory: sessionmaker[Session],
    tenant_id: str,
    name: str | None,
    parsed: ParsedDataset,
    raw: bytes,
) -> Dataset:
    dataset_id = ids.new_id(ids.DATASET)
    row = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        name=name or dataset_id,
        kind=parsed.kind.value,
        rows=codec.encode_rows(parsed.rows),
        rows_encoding=codec.ENCODING,
        row_count=parsed.row_count,
        label_counts=parsed.label_counts,
        bytes=len(raw),
        sha256=hashlib.sha256(raw).hexdigest(),
    )
    # One INSERT in one transaction: a dataset is stored whole or not at all.
    with factory() as session, session.begin():
        session.add(row)
    return row


@router.post("", response_model=DatasetObject, openapi_extra=_CREATE_OPENAPI)
async def create_dataset(
    request: Request, tenant: CurrentTenant, settings: SettingsDep, factory: SessionFactoryDep
) -> DatasetObject:
    """Upload a dataset: multipart ``file`` + ``kind`` (+ ``name``), or JSON ``records``."""
    limits = Limits(max_rows=settings.max_dataset_rows)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        parsed, raw, name = await _from_multipart(request, limits, settings.max_upload_bytes)
    elif content_type == "application/json":
        parsed, raw, name = await _from_json(request, limits)
    else:
        raise ApiError(
            415,
            "Send the dataset as multipart/form-data (file, kind) or application/json "
            "(kind, records).",
            param=None,
            code="unsupported_media_type",
        )
    row = await run_in_threadpool(_store, factory, tenant.id, name, parsed, raw)
    return DatasetObject.from_row(row)


@router.get("", response_model=ListResponse[DatasetObject])
def list_datasets(
    session: SessionDep,
    tenant: CurrentTenant,
    after: AfterQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> ListResponse[DatasetObject]:
    rows, has_more = keyset_page(
        session, Dataset, [Dataset.tenant_id == tenant.id], after=after, limit=limit
    )
    data = [DatasetObject.from_row(r) for r in rows]
    return ListResponse(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


def _get_owned(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    row = session.scalar(
        select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id)
    )
    if row is None:
        raise not_found("dataset", dataset_id)
    return row


@router.get("/{dataset_id}", response_model=DatasetObject)
def get_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant) -> DatasetObject:
    return DatasetObject.from_row(_get_owned(session, tenant.id, dataset_id))


@router.delete("/{dataset_id}", response_model=DeletedResponse)
def delete_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant) -> DeletedResponse:
    row = _get_owned(session, tenant.id, dataset_id)
    in_use = session.scalar(
        select(Job.id).where(
            Job.tenant_id == tenant.id,
            Job.status.in_(ACTIVE_STATUSES),
            or_(Job.training_file == dataset_id, Job.validation_file == dataset_id),
        )
    )
    if in_use:
        raise conflict(
            f"Dataset '{dataset_id}' is used by job {in_use}, which has not finished.",
            None,
            "dataset_in_use",
        )
    session.delete(row)
    session.commit()
    return DeletedResponse(id=dataset_id, object="dataset")
