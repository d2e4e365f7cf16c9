"""Which adapter a request means, and how its weights reach the engine.

Cache keys are ``(tenant_id, name, version)``: a replaced adapter gets a new version and so a
new key, and one tenant's ``sentiment`` can never be served to another tenant. The request
path resolves the current version from the database (one indexed lookup), so after a delete
or replace returns, later requests never reach the old weights; the stale resident copy is
dropped through :meth:`Batcher.invalidate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import Adapter as AdapterRow

if TYPE_CHECKING:
    from core.adapter import Adapter

AdapterKey = tuple[str, str, int]  # (tenant_id, name, version)


@dataclass(frozen=True)
class AdapterRef:
    """What the request path knows about an adapter without loading its weights."""

    id: str
    key: AdapterKey
    task: str
    method: str
    label_names: tuple[str, ...]
    text_pair: bool


def find_adapter(session: Session, tenant_id: str, name: str) -> AdapterRef | None:
    row = session.execute(
        select(
            AdapterRow.id,
            AdapterRow.version,
            AdapterRow.task,
            AdapterRow.method,
            AdapterRow.label_names,
            AdapterRow.config,
        ).where(AdapterRow.tenant_id == tenant_id, AdapterRow.name == name)
    ).one_or_none()
    if row is None:
        return None
    head = (row.config or {}).get("head", {})
    return AdapterRef(
        id=row.id,
        key=(tenant_id, name, row.version),
        task=row.task,
        method=row.method,
        label_names=tuple(row.label_names or ()),
        text_pair=bool(head.get("text_pair", False)),
    )


class AdapterGone(LookupError):  # noqa: N818 - reads as a state: "the adapter is gone"
    """The adapter was deleted or replaced between the lookup and the load."""


class DatabaseLoader:
    """``engine.run(loader=...)``: reads one adapter's bytes on a cache miss."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory

    def __call__(self, key: object) -> Adapter:
        from core.io.serialization import adapter_from_bytes

        tenant_id, name, version = key  # type: ignore[misc]
        with self.factory() as session:
            row = session.execute(
                select(AdapterRow.config, AdapterRow.weights).where(
                    AdapterRow.tenant_id == tenant_id,
                    AdapterRow.name == name,
                    AdapterRow.version == version,
                )
            ).one_or_none()
        if row is None:
            raise AdapterGone(f"adapter {name!r} version {version} no longer exists")
        return adapter_from_bytes(row.config, row.weights)
