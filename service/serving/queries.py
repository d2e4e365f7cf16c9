"""The serving path's database reads: which key and adapter a request means, and the loader
that reads an adapter's weights for the engine (residency itself is the engine's ledger,
:mod:`core.inference.residency`).

Cache keys are ``(tenant_id, name, version)``: a replaced adapter gets a new version and so a
new key, and one tenant's ``sentiment`` can never be served to another tenant. The request
path resolves the current version from the database (one indexed query, together with the
caller's key: :func:`find_key_and_adapter`; remembered on SQLite, see
:mod:`service.serving.lookups`), so after a delete or replace returns, later requests never
reach the old weights; the stale resident copy is dropped through :meth:`Batcher.invalidate`.

A job's checkpoint is served under its model name (``sentiment:ckpt-step-100``,
:mod:`service.jobs.checkpoints`), which no adapter name can be, at a version made of the
checkpoint's id: its key is never the adapter's nor another checkpoint's (a later job's of the
same name and step). Checkpoints never change; each request reads whether the checkpoint
still has its state, so one dropped (or its job deleted) is a 404 from the next request on,
and its resident copy, which no lookup reaches any more, waits for eviction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Row, and_, bindparam, select
from sqlalchemy.orm import Session, sessionmaker

from service import ids
from service.db.models import AdapterRow, ApiKey, Tenant
from service.jobs.checkpoints import (
    find_served_checkpoint,
    parse_checkpoint_model,
    served_checkpoint_state,
)

if TYPE_CHECKING:
    from core.adapter import Adapter
    from core.base import FrozenBase
    from core.decoder.base import DecoderBase

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
    # A job's checkpoint served as a model (its id is the checkpoint's): its state may be
    # dropped by a worker this process does not hear from, so no lookup cache remembers it.
    checkpoint: bool = False

    def window(self, base_max_length: int) -> int:
        """Tokens per input served: as ``HeadConfig.window`` (core's, which loads torch),
        never beyond the base's window (an adapter imported before imports checked it)."""
        limit = base_max_length - self.reserved
        return min(self.max_seq_length or limit, limit)


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
    return _make_ref(
        row.adapter_id,
        (tenant_id, name, row.version),
        row.task,
        row.method,
        row.label_names,
        row.config,
        row.base_model,
        row.base_fingerprint,
    )


def _make_ref(
    ref_id: str,
    key: AdapterKey,
    task: str,
    method: str,
    label_names: list[str] | None,
    config: dict[str, Any],
    base_model: str,
    base_fingerprint: str,
    checkpoint: bool = False,
) -> AdapterRef:
    head = (config or {}).get("head", {})
    kind = _base_kind(task, head)
    return AdapterRef(
        id=ref_id,
        key=key,
        task=task,
        method=method,
        label_names=tuple(label_names or ()),
        text_pair=bool(head.get("text_pair", False)),
        reserved=_reserved_positions(config, kind),
        max_seq_length=head.get("max_seq_length"),
        split_shared_prefix=bool(head.get("split_shared_prefix", False)),
        base_model=base_model,
        base_fingerprint=base_fingerprint,
        base_kind=kind,
        checkpoint=checkpoint,
    )


def _checkpoint_ref(
    conn: Connection, tenant_id: str, name: str, checkpoint: tuple[str, int]
) -> AdapterRef | None:
    """The ref of the checkpoint model ``name`` (``checkpoint``: its adapter name and step),
    if the tenant has it and it still has its state."""
    found = find_served_checkpoint(conn, tenant_id, *checkpoint)
    if found is None:
        return None
    checkpoint_id, config = found
    version = _checkpoint_version(checkpoint_id)
    if version is None:
        return None
    head = config["head"]
    return _make_ref(
        checkpoint_id,
        (tenant_id, name, version),
        head["task"],
        config["method"]["type"],
        head.get("label_names"),
        config,
        config["base_name"],
        config["base_fingerprint"],
        checkpoint=True,
    )


_CHECKPOINT_ID_PREFIX = f"{ids.CHECKPOINT}-"
_CHECKPOINT_ID_HEX = 24  # ids.new_id's random part


def _checkpoint_version(checkpoint_id: str) -> int | None:
    """A served checkpoint's key version: its id's random hex as a number (the loader reads
    the id back from it), so each checkpoint has a key of its own."""
    digits = checkpoint_id.removeprefix(_CHECKPOINT_ID_PREFIX)
    if len(digits) != _CHECKPOINT_ID_HEX or digits.strip("0123456789abcdef"):
        return None
    return int(digits, 16)


def _checkpoint_id(version: int) -> str:
    return f"{_CHECKPOINT_ID_PREFIX}{version:0{_CHECKPOINT_ID_HEX}x}"


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
    """The tenant's adapter ``name``, or the checkpoint a checkpoint's model name names."""
    checkpoint = parse_checkpoint_model(name)
    if checkpoint is not None:
        return _checkpoint_ref(conn, tenant_id, name, checkpoint)
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
    checkpoint = parse_checkpoint_model(name)
    if checkpoint is not None and key.revoked_at is None and key.tenant_exists:
        # No adapter is named so (the join found none): a second query, for checkpoints only.
        return key, _checkpoint_ref(conn, row.tenant_id, name, checkpoint)
    return key, _ref(row.tenant_id, name, row)


class AdapterGone(LookupError):  # noqa: N818 - reads as a state: "the adapter is gone"
    """The adapter was deleted or replaced between the lookup and the load."""


class DatabaseLoader:
    """``engine.run(loader=...)``: reads one adapter's bytes on a cache miss; a checkpoint's
    (:func:`find_adapter`) is built on its base, one of ``bases``."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        bases: Mapping[str, FrozenBase | DecoderBase] | None = None,
    ) -> None:
        self.factory = factory
        self.bases = bases or {}

    def __call__(self, key: object) -> Adapter:
        from core.io.serialization import adapter_from_bytes

        tenant_id, name, version = key  # type: ignore[misc]
        if parse_checkpoint_model(name) is not None:
            return self._checkpoint(tenant_id, name, version)
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

    def _checkpoint(self, tenant_id: str, name: str, version: int) -> Adapter:
        from core.errors import AdapterFormatError
        from core.training.checkpoint import (
            CheckpointError,
            adapter_from_checkpoint,
            checkpoint_adapter_config,
            read_meta,
        )

        with self.factory() as session:
            state = served_checkpoint_state(session, tenant_id, _checkpoint_id(version))
        if state is None:
            raise AdapterGone(f"checkpoint {name!r} no longer has its state")
        try:
            fingerprint = checkpoint_adapter_config(read_meta(state))["base_fingerprint"]
            base = next((b for b in self.bases.values() if b.fingerprint == fingerprint), None)
            if base is None:  # the request path refused it already (invariant 8)
                raise AdapterFormatError(f"checkpoint {name!r} was trained on a base not loaded")
            return adapter_from_checkpoint(state, base)
        except CheckpointError as e:
            raise AdapterFormatError(str(e)) from None
