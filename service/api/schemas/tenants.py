"""Tenant and API key bodies (admin endpoints)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas.common import NAME_PATTERN
from service.db.models import ApiKey, Tenant
from service.db.types import to_unix


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=128)
    is_admin: bool = False


class ApiKeyObject(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    tenant_id: str
    name: str | None
    prefix: str
    is_admin: bool
    created_at: int
    revoked_at: int | None

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
    # The secret, returned exactly once; only its hash is stored.
    key: str


class TenantObject(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    created_at: int

    @classmethod
    def from_row(cls, row: Tenant) -> TenantObject:
        return cls(id=row.id, name=row.name, created_at=to_unix(row.created_at) or 0)


class TenantCreated(TenantObject):
    api_key: ApiKeyCreated
