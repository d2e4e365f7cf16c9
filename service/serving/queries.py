"""The serving path's database reads: which key and adapter a request means, and the loader
that reads an adapter's weights for the engine (residency itself is the engine's ledger,
:mod:`core.inference.residency`).

Cache keys are ``(tenant_id, name, version)``: a replaced adapter gets a new version and so a
new key, and one tenant's ``sentiment`` can never be served to another tenant. The request
path resolves the current version from the database (one indexed query, together with the
caller's key: :func:`find_key_and_adapter`; remembered on SQLite, see
:mod:`service.serving.lookups`), so after a delete or replace returns, later requests never
reach the old weights; the stale resident copy is dropped through :meth:`Batcher.invalidate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Row, and_, bindparam, select
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import AdapterRow, ApiKey, Tenant

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
    reserved: int  # positions the method takes from the base's window (prompt tuning)
    # The head's trained length (HeadConfig.max_seq_length; None: saved before, the base's).
    max_seq_length: int | None = None
    # Reward: split a pair given without a prompt at its shared turn, as training did.
    split_shared_prefix: bool = False
    # The base it was trained on (name and weights' SHA-256): it runs on no other.
    base_model: str = ""
    base_fingerprint: str = ""
    base_kind: str = "encoder"  # "decoder": served by service.serving.decoder_scoring

    def window(self, base_max_length: int) -> int:
        """Tokens per input served: as ``HeadConfig.window`` (core's, which loads torch)."""
        return self.max_seq_length or base_max_length - self.reserved


_REF_COLUMNS = (
    AdapterRow.id.label("adapter_id"),
    AdapterRow.version,
    AdapterRow.task,
    AdapterRow.method,
    AdapterRow.label_names,
    AdapterRow.config,
    AdapterRow.base_model,
    AdapterRow.base_fingerprint,
)


def _ref(tenant_id: str, name: str, row: Row[Any]) -> AdapterRef | None:
    if row.adapter_id is None:
        return None
    head = (row.config or {}).get("head", {})
    kind = _base_kind(row.task, head)
    return AdapterRef(
        id=row.adapter_id,
        key=(tenant_id, name, row.version),
        task=row.task,
        method=row.method,
        label_names=tuple(row.label_names or ()),
        text_pair=bool(head.get("text_pair", False)),
        reserved=_reserved_positions(row.config, kind),
        max_seq_length=head.get("max_seq_length"),
        split_shared_prefix=bool(head.get("split_shared_prefix", False)),
        base_model=row.base_model,
        base_fingerprint=row.base_fingerprint,
        base_kind=kind,
    )


def _reserved_positions(config: dict[str, Any], kind: str) -> int:
    """Read by core's own method config for the adapter's kind of base, as loading the
    adapter will (``Adapter``)."""
    from core.methods import parse_method_config

    method = dict(config["method"])
    return parse_method_config(method.pop("type"), method, kind).reserved_positions


def _base_kind(task: str, head: dict[str, Any]) -> str:
    """The kind of base the adapter runs on, as its head says (a last-token head is a
    decoder's): not its task alone, since a reward model or classifier trains on either base.

    Read from the two fields that decide it, not by validating the whole stored head: the
    request path must not fail on a head this release would refuse (a field added or
    tightened since it was saved); loading the adapter validates it, where a bad one is the
    loader's error, not an uncaught one on every lookup."""
    from core.heads import head_base_kind

    return head_base_kind(task, str(head.get("pooling", "base")))


# The request path's two queries are built once, with bound parameters: building and
# cache-keying a select() per request cost 4x the query itself (487 vs 116 us on SQLite).
_FIND_ADAPTER = select(*_REF_COLUMNS).where(
    AdapterRow.tenant_id == bindparam("tenant_id"), AdapterRow.name == bindparam("name")
)


def find_adapter(conn: Connection, tenant_id: str, name: str) -> AdapterRef | None:
    row = conn.execute(_FIND_ADAPTER, {"tenant_id": tenant_id, "name": name}).one_or_none()
    return None if row is None else _ref(tenant_id, name, row)


@dataclass(frozen=True)
class KeyLookup:
    """An API key row (found by its hash) and whether its tenant still exists."""

    id: str
    tenant_id: str
    is_admin: bool
    revoked_at: datetime | None
    tenant_exists: bool


_FIND_KEY_AND_ADAPTER = (
    select(
        ApiKey.id,
        ApiKey.tenant_id,
        ApiKey.is_admin,
        ApiKey.revoked_at,
        Tenant.id.label("tenant_found"),
        *_REF_COLUMNS,
    )
    .select_from(ApiKey)
    .outerjoin(Tenant, Tenant.id == ApiKey.tenant_id)
    .outerjoin(
        AdapterRow,
        and_(AdapterRow.tenant_id == ApiKey.tenant_id, AdapterRow.name == bindparam("name")),
    )
    .where(ApiKey.key_hash == bindparam("key_hash"))
)


def find_key_and_adapter(
    conn: Connection, key_hash: str, name: str
) -> tuple[KeyLookup | None, AdapterRef | None]:
    """The caller's key and its tenant's adapter ``name`` in one indexed query.

    The request path of every inference call: one round trip instead of three (key, tenant,
    adapter). Fresh on every call; only :mod:`service.serving.lookups` remembers answers.
    """
    row = conn.execute(_FIND_KEY_AND_ADAPTER, {"key_hash": key_hash, "name": name}).one_or_none()
    if row is None:
        return None, None
    key = KeyLookup(
        row.id, row.tenant_id, bool(row.is_admin), row.revoked_at, row.tenant_found is not None
    )
    return key, _ref(row.tenant_id, name, row)


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
