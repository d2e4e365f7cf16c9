"""OpenAI's ``model`` object: the base encoder and the tenant's adapters.

Adapters are listed the way vLLM and LoRAX list LoRA adapters: ``id`` is the adapter's name
(what ``fine_tuned_model`` holds and ``/predict?adapter=`` takes), ``parent``/``root`` the
base model it runs on. The extras are loraplex's and optional for OpenAI clients.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from service.db.models import Adapter
from service.db.types import to_unix

# OpenAI marks its own base models this way; here it is the server's shared encoder.
BASE_OWNER = "system"


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # --- loraplex extras ---
    kind: Literal["base", "adapter"]
    root: str | None = None
    parent: str | None = None
    # base model
    max_model_len: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    num_params: int | None = None
    fingerprint: str | None = None
    # adapter
    adapter_id: str | None = None
    version: int | None = None
    method: str | None = None
    task: str | None = None
    label_names: list[str] | None = None

    @classmethod
    def from_adapter(cls, row: Adapter) -> ModelObject:
        return cls(
            id=row.name,
            created=to_unix(row.created_at) or 0,
            # The tenant is the "organization" (as in ``fine_tuning.job.organization_id``).
            owned_by=row.tenant_id,
            kind="adapter",
            root=row.base_model,
            parent=row.base_model,
            adapter_id=row.id,
            version=row.version,
            method=row.method,
            task=row.task,
            label_names=row.label_names,
        )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True
