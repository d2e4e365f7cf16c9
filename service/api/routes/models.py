"""``/v1/models``: OpenAI's Models API over the base encoder and the caller's adapters.

``client.models.list()`` is one page in the SDK (no cursor), so every adapter of the tenant is
listed at once; the adapter quota bounds how many that can be. The base model's id is
``settings.base_model_name``, the name jobs are created with (``model=``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.adapters.records import delete_adapter_row, find_adapter_row
from service.api.deps import AdapterCachesDep, CurrentTenant, SessionDep
from service.api.params import ModelId
from service.api.schemas.models import BASE_OWNER, ModelDeleted, ModelList, ModelObject
from service.db.models import AdapterRow
from service.errors import ErrorKind, ServiceError, not_found
from service.state import app_state

router = APIRouter(prefix="/v1/models", tags=["models"])


def _base_object(request: Request) -> ModelObject:
    state = app_state(request)
    settings, base = state.settings, state.base_model
    if base is None:  # not loaded yet (or no serving hook): what is known without it
        return ModelObject(id=settings.base_model_name, created=0, owned_by=BASE_OWNER, kind="base")
    try:
        # The weights' date stands in for the model's creation, as OpenAI reports for its own.
        created = int((base.path / "model.safetensors").stat().st_mtime)
    except OSError:
        created = 0
    return ModelObject(
        id=settings.base_model_name,
        created=created,
        owned_by=BASE_OWNER,
        kind="base",
        root=base.name,
        max_model_len=base.max_length,
        hidden_size=base.hidden_size,
        num_layers=base.num_layers,
        num_params=base.num_params,
        fingerprint=base.fingerprint,
    )


def _is_base(request: Request, model_id: str) -> bool:
    return model_id == app_state(request).settings.base_model_name


def _owned_adapter(session: Session, tenant_id: str, model_id: str) -> AdapterRow:
    row = find_adapter_row(session, tenant_id, model_id)
    if row is None:  # another tenant's adapter included: its existence is never confirmed
        raise not_found("model", model_id)
    return row


@router.get("", response_model=ModelList, response_model_exclude_none=True, summary="List models")
def list_models(request: Request, session: SessionDep, tenant: CurrentTenant) -> ModelList:
    """OpenAI's model list: the base model first, then the caller's adapters, newest first,
    all in one page."""
    rows = session.scalars(
        select(AdapterRow)
        .where(AdapterRow.tenant_id == tenant.id)
        .order_by(AdapterRow.created_at.desc(), AdapterRow.id.desc())
    )
    return ModelList(data=[_base_object(request), *(ModelObject.from_adapter(r) for r in rows)])


# ``:path``: a base model id such as ``sentence-transformers/all-MiniLM-L6-v2`` holds a slash
# (the SDK sends it as %2F, which the server decodes before routing).
@router.get(
    "/{model_id:path}",
    response_model=ModelObject,
    response_model_exclude_none=True,
    summary="Get a model",
)
def retrieve_model(
    model_id: ModelId, request: Request, session: SessionDep, tenant: CurrentTenant
) -> ModelObject:
    """The base model (by its name, slash included) or one of the caller's adapters (by its
    name)."""
    if _is_base(request, model_id):
        return _base_object(request)
    return ModelObject.from_adapter(_owned_adapter(session, tenant.id, model_id))


@router.delete("/{model_id:path}", response_model=ModelDeleted, summary="Delete a model")
def delete_model(
    model_id: ModelId,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    caches: AdapterCachesDep,
) -> ModelDeleted:
    """Deletes a fine-tuned model, i.e. an adapter, as `DELETE /v1/adapters/{name}` does;
    403 for the base model, which every tenant shares."""
    if _is_base(request, model_id):
        raise ServiceError(
            "The base model is shared by every tenant and cannot be deleted.",
            code="base_model_not_deletable",
            param="model",
            kind=ErrorKind.FORBIDDEN,
        )
    delete_adapter_row(session, _owned_adapter(session, tenant.id, model_id), caches)
    return ModelDeleted(id=model_id)
