"""Tenant and API key bodies (admin endpoints)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas.common import CREATED_AT, NAME_PATTERN
from service.db.models import ApiKey, Tenant
from service.db.types import to_unix
from service.names import NoControlCharacters

TENANT_ID = "tenant-1a2b3c4d5e6f7a8b9c0d1e2f"
KEY_EXAMPLE = {
    "id": "key-7c1e9a3b5d2f4e6a8c0b1d3f",
    "object": "api_key",
    "tenant_id": TENANT_ID,
    "name": "initial",
    "prefix": "lpx_4kQ9",
    "is_admin": False,
    "created_at": 1764950400,
    "revoked_at": None,
}
SECRET_EXAMPLE = "lpx_4kQ9mZ2vT8rW1xY6bN3cL7dF0gH5jK9pS2uV4wX8yAe"
TENANT_EXAMPLE = {
    "id": TENANT_ID,
    "object": "tenant",
    "name": "acme",
    "created_at": 1764950400,
}


class TenantCreate(BaseModel):
    """A new tenant: a separate namespace of datasets, jobs and adapters."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "acme"}]})

    name: str = Field(
        min_length=1,
        max_length=128,
        pattern=NAME_PATTERN,
        description="Unique tenant name: letters, digits, `.`, `_` and `-`, starting with a "
        "letter or digit.",
    )


class ApiKeyCreate(BaseModel):
    """A new API key for an existing tenant."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "ci", "is_admin": False}]}
    )

    name: Annotated[str | None, NoControlCharacters] = Field(
        default=None, min_length=1, max_length=128, description="A label to recognise the key by."
    )
    is_admin: bool = Field(
        False,
        description="Admin keys may also manage tenants and keys (`/v1/tenants`); give them "
        "out sparingly.",
    )


class ApiKeyObject(BaseModel):
    """An API key without its secret."""

    model_config = ConfigDict(json_schema_extra={"examples": [KEY_EXAMPLE]})

    id: str = Field(description="The key's id (not the secret).")
    object: Literal["api_key"] = Field("api_key", description="Always `api_key`.")
    tenant_id: str = Field(description="The tenant the key acts for.")
    name: str | None = Field(description="The key's label, if it was given one.")
    prefix: str = Field(
        description="The first characters of the secret, to tell keys apart; the secret "
        "itself is only ever shown at creation."
    )
    is_admin: bool = Field(description="Whether the key may manage tenants and keys.")
    created_at: int = Field(description=CREATED_AT)
    revoked_at: int | None = Field(
        description="When the key was revoked, in Unix seconds; null while it is valid."
    )

    @classmethod
    def from_row(cls, row: ApiKey) -> ApiKeyObject:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            name=row.name,
            prefix=row.prefix,
            is_admin=row.is_admin,
            created_at=to_unix(row.created_at) or 0,
            revoked_at=to_unix(row.revoked_at),
        )


class ApiKeyCreated(ApiKeyObject):
    """A new API key, with its secret: shown this once, as only its hash is stored."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{**KEY_EXAMPLE, "key": SECRET_EXAMPLE}]}
    )

    key: str = Field(
        description="The secret to send as `Authorization: Bearer <key>`. It is returned only "
        "here: store it now."
    )


class TenantObject(BaseModel):
    """A tenant: a separate namespace of datasets, jobs and adapters."""

    model_config = ConfigDict(json_schema_extra={"examples": [TENANT_EXAMPLE]})

    id: str = Field(description="The tenant's id.")
    object: Literal["tenant"] = Field("tenant", description="Always `tenant`.")
    name: str = Field(description="The tenant's unique name.")
    created_at: int = Field(description=CREATED_AT)

    @classmethod
    def from_row(cls, row: Tenant) -> TenantObject:
        return cls(id=row.id, name=row.name, created_at=to_unix(row.created_at) or 0)


class TenantCreated(TenantObject):
    """A new tenant and its first API key (named `initial`), secret included."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{**TENANT_EXAMPLE, "api_key": {**KEY_EXAMPLE, "key": SECRET_EXAMPLE}}]
        }
    )

    api_key: ApiKeyCreated = Field(description="The tenant's first key; its secret is shown once.")
