"""``/v1/models``: OpenAI's Models API over the bases and the caller's adapters.

``client.models.list()`` is one page in the SDK (no cursor), so every adapter of the tenant is
listed at once; the adapter quota bounds how many that can be. A base's id is its configured
name (``LORAPLEX_BASES``), the name jobs are created with (``model=``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.convertors import PathConvertor, register_url_convertor

from service.adapters.records import delete_adapter_row, find_adapter_row
from service.api.deps import AdapterCachesDep, CurrentTenant, SessionDep
from service.api.params import ModelId
from service.api.schemas.models import BASE_OWNER, ModelDeleted, ModelList, ModelObject
from service.bases import BaseKind, BaseSpec, base_specs
from service.db.models import AdapterRow, Checkpoint
from service.db.types import to_unix
from service.errors import ErrorKind, ServiceError, conflict, not_found
from service.jobs.checkpoints import parse_checkpoint_model, withdraw_checkpoint
from service.serving.queries import AdapterRef, find_adapter
from service.state import app_state

if TYPE_CHECKING:
    from core.base import FrozenBase
    from core.decoder.base import DecoderBase

router = APIRouter(prefix="/v1/models", tags=["models"])


class _ModelIdConvertor(PathConvertor):
    """Starlette's ``path``, newlines included: its ``.*`` stops at one, so ``abc%0A``
    matched no route (a bare 404) where every other id with a control character is a 422
    naming it (service.names)."""

    regex = r"[\s\S]*"


register_url_convertor("model_id", _ModelIdConvertor())


def _weights_date(base: FrozenBase | DecoderBase) -> int:
    """The weights file's date, which stands in for the model's creation as OpenAI reports
    for its own; 0 if it cannot be read."""
    path = base.path
    if path.is_dir():
        path = path / "model.safetensors"
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


def _base_object(request: Request, spec: BaseSpec) -> ModelObject:
    bases = app_state(request).bases
    if bases is None or spec.name not in bases:  # not loaded yet: what the settings say
        return ModelObject(
            id=spec.name, created=0, owned_by=BASE_OWNER, kind="base", base_kind=spec.kind
        )
    base = bases[spec.name]
    # A decoder's limit is what generation holds (prompt and reply), not the position table's.
    server = (app_state(request).generation or {}).get(spec.name)
    return ModelObject(
        id=spec.name,
        created=_weights_date(base),
        owned_by=BASE_OWNER,
        kind="base",
        base_kind=spec.kind,
        root=base.name,
        max_model_len=server.context_length if server is not None else base.max_length,
        hidden_size=base.config.hidden_size,
        num_layers=base.num_layers,
        num_params=base.num_params,
        fingerprint=base.fingerprint,
    )


def _base_kind(request: Request, base_model: str) -> BaseKind | None:
    # A fine-tuned model of a base this deployment does not load says no base kind.
    spec = base_specs(app_state(request).settings).get(base_model)
    return spec.kind if spec is not None else None


def _adapter_object(request: Request, row: AdapterRow) -> ModelObject:
    return ModelObject.from_adapter(row, base_kind=_base_kind(request, row.base_model))


def _served_checkpoint(session: Session, tenant_id: str, model_id: str) -> AdapterRef | None:
    """The caller's checkpoint model ``model_id`` (``<adapter>:ckpt-step-<N>``) while it
    serves, resolved as serving resolves it; None for any other name."""
    if parse_checkpoint_model(model_id) is None:
        return None
    return find_adapter(session.connection(), tenant_id, model_id)


def _checkpoint_object(
    request: Request, session: Session, tenant_id: str, model_id: str
) -> ModelObject | None:
    ref = _served_checkpoint(session, tenant_id, model_id)
    if ref is None:
        return None
    created = session.scalar(select(Checkpoint.created_at).where(Checkpoint.id == ref.id))
    return ModelObject.from_checkpoint(
        ref, created=to_unix(created) or 0, base_kind=_base_kind(request, ref.base_model)
    )


def _owned_adapter(session: Session, tenant_id: str, model_id: str) -> AdapterRow:
    row = find_adapter_row(session, tenant_id, model_id)
    if row is None:  # another tenant's adapter included: its existence is never confirmed
        raise not_found("model", model_id)
    return row


@router.get("", response_model=ModelList, response_model_exclude_none=True, summary="List models")
def list_models(request: Request, session: SessionDep, tenant: CurrentTenant) -> ModelList:
    """OpenAI's model list: the bases first (in `LORAPLEX_BASES` order), then the caller's
    adapters, newest first, all in one page."""
    rows = session.scalars(
        select(AdapterRow)
        .where(AdapterRow.tenant_id == tenant.id)
        .order_by(AdapterRow.created_at.desc(), AdapterRow.id.desc())
    )
    specs = base_specs(app_state(request).settings).values()
    return ModelList(
        data=[
            *(_base_object(request, spec) for spec in specs),
            *(_adapter_object(request, row) for row in rows),
        ]
    )


# ``:model_id`` (a path): a base model id such as ``sentence-transformers/all-MiniLM-L6-v2``
# holds a slash (the SDK sends it as %2F, which the server decodes before routing).
@router.get(
    "/{model_id:model_id}",
    response_model=ModelObject,
    response_model_exclude_none=True,
    summary="Get a model",
)
def retrieve_model(
    model_id: ModelId, request: Request, session: SessionDep, tenant: CurrentTenant
) -> ModelObject:
    """A base (by its name, slash included), one of the caller's adapters (by its name) or a
    checkpoint of the caller's jobs (`<adapter>:ckpt-step-<N>`, while it serves)."""
    spec = base_specs(app_state(request).settings).get(model_id)
    if spec is not None:
        return _base_object(request, spec)
    checkpoint = _checkpoint_object(request, session, tenant.id, model_id)
    if checkpoint is not None:
        return checkpoint
    return _adapter_object(request, _owned_adapter(session, tenant.id, model_id))


@router.delete("/{model_id:model_id}", response_model=ModelDeleted, summary="Delete a model")
def delete_model(
    model_id: ModelId,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    caches: AdapterCachesDep,
) -> ModelDeleted:
    """Deletes a fine-tuned model, i.e. an adapter, as `DELETE /v1/adapters/{name}` does
    (its jobs' checkpoint models stop serving with it); 403 for the base model, which every
    tenant shares. A checkpoint model (`<adapter>:ckpt-step-<N>`) is withdrawn: its state is
    dropped once its job has finished (409 before: the job resumes from it)."""
    if model_id in base_specs(app_state(request).settings):
        raise ServiceError(
            "The base model is shared by every tenant and cannot be deleted.",
            code="base_model_not_deletable",
            param="model",
            kind=ErrorKind.FORBIDDEN,
        )
    checkpoint = _served_checkpoint(session, tenant.id, model_id)
    if checkpoint is not None:
        if not withdraw_checkpoint(session, tenant.id, checkpoint.id):
            raise conflict(
                f"Checkpoint model '{model_id}' belongs to a job that has not finished and may "
                "resume from it; cancel the job, or wait for it to end, first.",
                "model",
                "checkpoint_in_use",
            )
        session.commit()
        for drop in caches:
            drop(tenant.id, model_id)
        return ModelDeleted(id=model_id)
    if not delete_adapter_row(session, _owned_adapter(session, tenant.id, model_id), caches):
        raise not_found("model", model_id)
    return ModelDeleted(id=model_id)
