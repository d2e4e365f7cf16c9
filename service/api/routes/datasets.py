"""``/v1/datasets``: upload (multipart file or JSON records), list, get, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.api.deps import CurrentTenant, SessionDep, SessionFactoryDep, SettingsDep
from service.api.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, keyset_page
from service.api.schemas.common import DeletedResponse, ListResponse
from service.api.schemas.datasets import DatasetCreateJSON, DatasetObject
from service.api.uploads import (
    dataset_upload_body,
    form_text,
    media_type,
    read_upload,
    unsupported_media_type,
)
from service.datasets.store import delete_owned_dataset, get_owned_dataset, store_dataset
from service.datasets.validation import (
    DatasetFormat,
    DatasetKind,
    Limits,
    ParsedDataset,
    detect_format,
    parse_file,
    parse_records,
)
from service.db.models import Dataset
from service.errors import invalid

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_KINDS = [k.value for k in DatasetKind]

# Two bodies for one route, so the request body is documented by hand.
_CREATE_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": dataset_upload_body(
                ["kind"],
                {
                    "kind": {"type": "string", "enum": _KINDS},
                    "name": {"type": "string", "maxLength": 256},
                    "format": {"type": "string", "enum": [f.value for f in DatasetFormat]},
                },
            ),
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


async def _from_multipart(
    request: Request, limits: Limits, max_bytes: int
) -> tuple[ParsedDataset, bytes, str | None]:
    # Starlette spools file parts to disk past 1 MB; the middleware has already bounded the
    # whole body, so nothing here can grow without limit.
    async with request.form(max_files=1, max_fields=8) as form:
        kind = _kind(form.get("kind"))
        name = form_text(form.get("name"), "name")
        fmt_field = form_text(form.get("format"), "format", 16)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise invalid("A dataset file is required in the 'file' field.", "file", "missing_file")
        data = await read_upload(upload, max_bytes)
        filename, content_type = upload.filename, upload.content_type
    if fmt_field is not None:
        if fmt_field not in {f.value for f in DatasetFormat}:
            raise invalid(f"format must be jsonl or csv; got {fmt_field!r}.", "format")
        fmt = DatasetFormat(fmt_field)
    else:
        fmt = detect_format(filename, content_type, data)
    parsed = await run_in_threadpool(parse_file, data, kind, fmt, limits)
    return parsed, data, name or filename


async def _from_json(request: Request, limits: Limits) -> tuple[ParsedDataset, bytes, str | None]:
    body = await request.body()
    try:
        payload = DatasetCreateJSON.model_validate_json(body)
    except ValidationError as exc:
        # Read by hand (one route, two bodies); answered as FastAPI answers a declared body.
        raise RequestValidationError(exc.errors()) from None
    parsed = await run_in_threadpool(parse_records, payload.records, payload.kind, limits)
    return parsed, body, payload.name


@router.post("", response_model=DatasetObject, openapi_extra=_CREATE_OPENAPI)
async def create_dataset(
    request: Request, tenant: CurrentTenant, settings: SettingsDep, factory: SessionFactoryDep
) -> DatasetObject:
    """Upload a dataset: multipart ``file`` + ``kind`` (+ ``name``), or JSON ``records``."""
    limits = Limits(max_rows=settings.max_dataset_rows)
    content_type = media_type(request)
    if content_type == "multipart/form-data":
        parsed, raw, name = await _from_multipart(request, limits, settings.max_upload_bytes)
    elif content_type == "application/json":
        parsed, raw, name = await _from_json(request, limits)
    else:
        raise unsupported_media_type(
            "Send the dataset as multipart/form-data (file, kind) or application/json "
            "(kind, records)."
        )
    row = await run_in_threadpool(store_dataset, factory, tenant.id, name, parsed, raw)
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
    return ListResponse.page(data, has_more)


@router.get("/{dataset_id}", response_model=DatasetObject)
def get_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant) -> DatasetObject:
    return DatasetObject.from_row(get_owned_dataset(session, tenant.id, dataset_id))


@router.delete("/{dataset_id}", response_model=DeletedResponse)
def delete_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant) -> DeletedResponse:
    delete_owned_dataset(session, get_owned_dataset(session, tenant.id, dataset_id))
    return DeletedResponse(id=dataset_id, object="dataset")
