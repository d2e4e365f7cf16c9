"""``/v1/files``: OpenAI's Files API as a face of the datasets (same records, same checks).

What differs from ``/v1/datasets`` is only the shape: ``purpose`` must be ``fine-tune``, the
kind is inferred from the rows unless the extra form field ``kind`` gives it, and objects are
OpenAI ``file`` objects (with loraplex's ``kind``/``row_count`` as extras). A file id is a
dataset id: either route reads, lists and deletes what the other uploaded.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.api.deps import (
    CurrentTenant,
    LongRequestTenantId,
    SessionDep,
    SessionFactoryDep,
    SettingsDep,
)
from service.api.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, keyset_page
from service.api.params import FileId
from service.api.schemas.common import ListResponse
from service.api.schemas.files import FINE_TUNE_PURPOSE, FileDeleted, FileObject
from service.api.uploads import (
    DATASET_KINDS,
    dataset_kind,
    dataset_upload_body,
    form_text,
    read_upload,
    require_multipart,
    upload_name,
)
from service.datasets import codec
from service.datasets.infer import infer_kind
from service.datasets.reading import detect_format
from service.datasets.rows import Limits
from service.datasets.store import (
    UploadDigest,
    delete_owned_dataset,
    get_owned_dataset,
    store_dataset,
)
from service.datasets.validation import parse_file
from service.db.models import Dataset
from service.errors import invalid, unsupported

router = APIRouter(prefix="/v1/files", tags=["files"])

_CREATE_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": dataset_upload_body(
                ["purpose"],
                {
                    "purpose": {
                        "type": "string",
                        "enum": [FINE_TUNE_PURPOSE],
                        "description": "Must be `fine-tune`: loraplex files are training data.",
                    },
                    "kind": {
                        "type": "string",
                        "enum": DATASET_KINDS,
                        "description": "Optional: inferred from the first row's fields "
                        "(chosen + rejected → preference, text + label → classification).",
                    },
                },
            )
        },
    }
}


@router.post(
    "", response_model=FileObject, summary="Upload a training file", openapi_extra=_CREATE_OPENAPI
)
async def create_file(
    request: Request,
    tenant_id: LongRequestTenantId,
    settings: SettingsDep,
    factory: SessionFactoryDep,
) -> FileObject:
    """OpenAI's file upload (`client.files.create(file=..., purpose="fine-tune")`): the file
    is checked and stored as a dataset, whose kind is inferred from the first row unless the
    extra form field `kind` gives it."""
    require_multipart(request, "file", "file, purpose")
    async with request.form(max_files=1, max_fields=8) as form:
        purpose = form_text(form.get("purpose"), "purpose", 64)
        if purpose is None:
            raise invalid("purpose is required; use 'fine-tune'.", "purpose", "missing_purpose")
        if purpose != FINE_TUNE_PURPOSE:
            raise unsupported(
                f"purpose {purpose!r} is not supported: loraplex files are training data "
                f"(purpose '{FINE_TUNE_PURPOSE}').",
                "purpose",
                "unsupported_purpose",
            )
        if any(key.startswith("expires_after") for key in form):
            raise unsupported(
                "expires_after is not supported: files are kept until deleted.",
                "expires_after",
                "unsupported_parameter",
            )
        kind_field = form_text(form.get("kind"), "kind", 32)
        kind = dataset_kind(kind_field) if kind_field is not None else None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise invalid("A file is required in the 'file' field.", "file", "missing_file")
        name = upload_name(upload)
        data = await read_upload(upload, settings.max_upload_bytes)
        filename, upload_type = upload.filename, upload.content_type

    fmt = detect_format(filename, upload_type, data)
    limits = Limits(max_rows=settings.max_dataset_rows)
    kind = kind or infer_kind(data, fmt)
    parsed = await run_in_threadpool(parse_file, data, kind, fmt, limits)
    row = await run_in_threadpool(
        store_dataset,
        factory,
        tenant_id,
        name,
        parsed,
        UploadDigest.of(data),
        settings.max_dataset_bytes_per_tenant,
    )
    return FileObject.from_row(row)


@router.get("", response_model=ListResponse[FileObject], summary="List files")
def list_files(
    session: SessionDep,
    tenant: CurrentTenant,
    after: AfterQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    order: Annotated[Literal["desc", "asc"], Query(description="by created_at")] = "desc",
    purpose: Annotated[
        str | None,
        Query(max_length=64, description="Only files of this purpose (all are `fine-tune`)."),
    ] = None,
) -> ListResponse[FileObject]:
    """The caller's files (its datasets), newest first unless `order=asc`; any `purpose` but
    `fine-tune` lists nothing."""
    if purpose is not None and purpose != FINE_TUNE_PURPOSE:
        return ListResponse(data=[], has_more=False)  # loraplex holds no other purpose
    rows, has_more = keyset_page(
        session,
        Dataset,
        [Dataset.tenant_id == tenant.id],
        after=after,
        limit=limit,
        descending=order == "desc",
    )
    data = [FileObject.from_row(r) for r in rows]
    return ListResponse.page(data, has_more)


@router.get("/{file_id}", response_model=FileObject, summary="Get a file")
def retrieve_file(file_id: FileId, session: SessionDep, tenant: CurrentTenant) -> FileObject:
    """One file (dataset), as OpenAI's file object."""
    return FileObject.from_row(get_owned_dataset(session, tenant.id, file_id, "file"))


@router.get(
    "/{file_id}/content",
    response_class=Response,
    summary="Get a file's rows",
    responses={
        200: {
            "description": "One JSON object per line.",
            "content": {
                "application/jsonl": {
                    "example": '{"text": "A delight from start to finish.", "label": "fresh"}\n'
                }
            },
        }
    },
)
def retrieve_file_content(file_id: FileId, session: SessionDep, tenant: CurrentTenant) -> Response:
    """The rows as validated and stored (normalised JSON Lines), not the upload byte for byte."""
    row = get_owned_dataset(session, tenant.id, file_id, "file")
    session.refresh(row, ["rows"])  # deferred blob: load it only here
    rows = codec.iter_rows(row.rows, row.rows_encoding)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return Response(text.encode("utf-8"), media_type="application/jsonl")


@router.delete("/{file_id}", response_model=FileDeleted, summary="Delete a file")
def delete_file(file_id: FileId, session: SessionDep, tenant: CurrentTenant) -> FileDeleted:
    """Deletes the file (dataset); 409 while a job that has not finished uses it."""
    delete_owned_dataset(session, get_owned_dataset(session, tenant.id, file_id, "file"))
    return FileDeleted(id=file_id)
