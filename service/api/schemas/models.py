"""OpenAI's ``model`` object: the bases (encoders, decoders) and the tenant's adapters.

Adapters are listed the way vLLM and LoRAX list LoRA adapters: ``id`` is the adapter's name
(what ``fine_tuned_model`` holds and ``/predict?adapter=`` takes), ``parent``/``root`` the
base model it runs on. The extras are loraplex's and optional for OpenAI clients.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas.adapters import ADAPTER_EXAMPLE
from service.db.models import AdapterRow
from service.db.types import to_unix
from service.serving.queries import AdapterRef

# OpenAI marks its own base models this way; here it is the server's shared bases.
BASE_OWNER = "system"


BASE_EXAMPLE = {
    "id": "sentence-transformers/all-MiniLM-L6-v2",
    "object": "model",
    "created": 1764950400,
    "owned_by": BASE_OWNER,
    "kind": "base",
    "base_kind": "encoder",
    "root": "sentence-transformers/all-MiniLM-L6-v2",
    "max_model_len": 256,
    "hidden_size": 384,
    "num_layers": 6,
    "num_params": 22565376,
    "fingerprint": ADAPTER_EXAMPLE["base_fingerprint"],
}
ADAPTER_MODEL_EXAMPLE = {
    "id": ADAPTER_EXAMPLE["name"],
    "object": "model",
    "created": ADAPTER_EXAMPLE["created_at"],
    "owned_by": "tenant-1a2b3c4d5e6f7a8b9c0d1e2f",
    "kind": "adapter",
    "base_kind": "encoder",
    "root": ADAPTER_EXAMPLE["base_model"],
    "parent": ADAPTER_EXAMPLE["base_model"],
    "adapter_id": ADAPTER_EXAMPLE["id"],
    "version": ADAPTER_EXAMPLE["version"],
    "method": ADAPTER_EXAMPLE["method"],
    "task": ADAPTER_EXAMPLE["task"],
    "label_names": ADAPTER_EXAMPLE["label_names"],
}
_BASE_ONLY = "Base model only: "
_ADAPTER_ONLY = "Adapters only: "
_FINE_TUNED = "Adapters and checkpoints only: "


class ModelObject(BaseModel):
    """The base model or one of the caller's adapters, as OpenAI's model object.

    Fields that do not apply to the model's `kind` are left out.
    """

    model_config = ConfigDict(json_schema_extra={"examples": [BASE_EXAMPLE, ADAPTER_MODEL_EXAMPLE]})

    id: str = Field(
        description="The model's name: the base model's name, or the adapter's name (what "
        "`model=` and `/predict?adapter=` take)."
    )
    object: Literal["model"] = Field("model", description="Always `model`.")
    created: int = Field(
        description="Unix seconds: when the adapter or checkpoint was stored, or the date of "
        "the base model's weights file."
    )
    owned_by: str = Field(
        description=f"`{BASE_OWNER}` for the shared base model, else the owning tenant's id."
    )
    # --- loraplex extras ---
    kind: Literal["base", "adapter", "checkpoint"] = Field(
        description="`base` for a shared base model, `adapter` for a fine-tuned model, "
        "`checkpoint` for a job's checkpoint (`<adapter>:ckpt-step-<N>`, served while the "
        "checkpoint keeps its state; retrieved by name, not listed: a job's checkpoints list "
        "them; DELETE withdraws it once its job has finished)."
    )
    base_kind: Literal["encoder", "decoder"] | None = Field(
        None,
        description="The kind of the base (the model itself, or the one an adapter extends): "
        "`encoder` (classifiers and reward models: /predict, /reward/compare) or `decoder` "
        "(a causal language model: chat). Absent for an adapter of a base this deployment "
        "does not load.",
    )
    root: str | None = Field(None, description="The base model everything here runs on.")
    parent: str | None = Field(None, description=_FINE_TUNED + "the base model it extends.")
    # base model
    max_model_len: int | None = Field(
        None,
        description=_BASE_ONLY + "the longest input in tokens: an encoder truncates longer "
        "ones; a decoder generates with prompt and reply within it (longer prompts: 400).",
    )
    hidden_size: int | None = Field(None, description=_BASE_ONLY + "the embedding width.")
    num_layers: int | None = Field(None, description=_BASE_ONLY + "the number of layers.")
    num_params: int | None = Field(None, description=_BASE_ONLY + "the number of parameters.")
    fingerprint: str | None = Field(
        None, description=_BASE_ONLY + "SHA-256 of its weights (adapters record it)."
    )
    # adapter
    adapter_id: str | None = Field(None, description=_ADAPTER_ONLY + "the adapter's id.")
    version: int | None = Field(None, description=_ADAPTER_ONLY + "the adapter's version.")
    method: str | None = Field(None, description=_FINE_TUNED + "the fine-tuning method.")
    task: str | None = Field(
        None, description=_FINE_TUNED + "`classification`, `reward`, `chat` or `dpo`."
    )
    label_names: list[str] | None = Field(
        None, description=_FINE_TUNED + "the labels a classifier predicts, in output order."
    )
    # checkpoint
    checkpoint_id: str | None = Field(
        None, description="Checkpoints only: the checkpoint's id (`ftckpt-…`)."
    )

    @classmethod
    def from_adapter(
        cls, row: AdapterRow, base_kind: Literal["encoder", "decoder"] | None = None
    ) -> ModelObject:
        return cls(
            id=row.name,
            created=to_unix(row.created_at) or 0,
            # The tenant is the "organization" (as in ``fine_tuning.job.organization_id``).
            owned_by=row.tenant_id,
            kind="adapter",
            base_kind=base_kind,
            root=row.base_model,
            parent=row.base_model,
            adapter_id=row.id,
            version=row.version,
            method=row.method,
            task=row.task,
            label_names=row.label_names,
        )

    @classmethod
    def from_checkpoint(
        cls,
        ref: AdapterRef,
        created: int,
        base_kind: Literal["encoder", "decoder"] | None = None,
    ) -> ModelObject:
        """``ref``: the checkpoint as serving resolves its model name (``ref.id`` is the
        checkpoint's id)."""
        tenant_id, name, _ = ref.key
        return cls(
            id=name,
            created=created,
            owned_by=tenant_id,
            kind="checkpoint",
            base_kind=base_kind,
            root=ref.base_model,
            parent=ref.base_model,
            checkpoint_id=ref.id,
            method=ref.method,
            task=ref.task,
            label_names=list(ref.label_names) or None,  # as an adapter row: none, not []
        )


class ModelList(BaseModel):
    """Every model the caller can use: the bases first, then its adapters, newest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"object": "list", "data": [BASE_EXAMPLE, ADAPTER_MODEL_EXAMPLE]}]
        }
    )

    object: Literal["list"] = Field("list", description="Always `list`.")
    data: list[ModelObject] = Field(description="The models, all in one page.")


class ModelDeleted(BaseModel):
    """What deleting a fine-tuned model answers."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"id": "sentiment-lora", "object": "model", "deleted": True}]
        }
    )

    id: str = Field(description="The deleted model's (adapter's) name.")
    object: Literal["model"] = Field("model", description="Always `model`.")
    deleted: bool = Field(True, description="Always true: a failed deletion answers an error.")
