"""SQLAlchemy 2.0 typed models: the database is the source of truth for all user data.

Dialect-neutral on purpose (SQLite for one box, PostgreSQL for many): bytes are
``LargeBinary``, structured fields ``JSON``, timestamps UTC-aware, ids are strings.
Every table that holds user data carries ``tenant_id`` so every query can be scoped by it.
Large blobs (dataset rows, checkpoint state, adapter weights) are ``deferred``: listings
never load them unless asked.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service import ids
from service.datasets.rows import DatasetKind  # lives with the pure, SQL-free row checks
from service.db.types import UTCDateTime, utcnow

# Stable constraint names, so Alembic can address them on every dialect.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# ``none_as_null``: a Python None is SQL NULL, not the JSON literal ``null``.
JsonColumn = JSON(none_as_null=True)
# SQLite only auto-increments an ``INTEGER PRIMARY KEY``; PostgreSQL gets a bigint identity.
AutoIncrementId = BigInteger().with_variant(Integer(), "sqlite")


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    CANCEL_REQUESTED = "cancel_requested"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A worker holds a lease on jobs in these states.
LEASED_STATUSES = (JobStatus.RUNNING, JobStatus.CANCEL_REQUESTED)
# Jobs that count against the concurrency quota and reserve their adapter name.
ACTIVE_STATUSES = (
    JobStatus.VALIDATING_FILES,
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.CANCEL_REQUESTED,
)
TERMINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def _in_list(values: tuple[str, ...] | type[StrEnum]) -> str:
    return ", ".join(f"'{v}'" for v in values)


_ACTIVE_SQL = f"status IN ({_in_list(ACTIVE_STATUSES)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(
        String(64), primary_key=True, default=lambda: ids.new_id(ids.TENANT)
    )
    name: Mapped[str] = mapped_column(String(128), unique=True)
    # Monotonic per-tenant counter behind adapter versions: deleting and recreating an adapter
    # with the same name must never reuse a version, or caches keyed by version go stale.
    adapter_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(
        String(64), primary_key=True, default=lambda: ids.new_id(ids.API_KEY)
    )
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(128))
    # First characters of the secret, shown in listings so users can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    # sha256 hex of the whole secret; the secret itself is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (
        CheckConstraint(f"kind IN ({_in_list(DatasetKind)})", name="kind"),
        Index("ix_datasets_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(
        String(64), primary_key=True, default=lambda: ids.new_id(ids.DATASET)
    )
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(String(32))
    # Normalised rows as gzip-compressed JSON Lines (see ``service.datasets.codec``): one
    # blob keeps the write a single INSERT and is several times smaller than a JSON array.
    rows: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    rows_encoding: Mapped[str] = mapped_column(String(32), default="jsonl+gzip")
    row_count: Mapped[int] = mapped_column(Integer)
    # {label: count} for classification; None for preference pairs.
    label_counts: Mapped[dict[str, int] | None] = mapped_column(JsonColumn)
    # Preference pairs: {"split_rows", "identical_pairs"} (service.datasets.pairs); None for
    # classification and for datasets stored before it was counted.
    pair_report: Mapped[dict[str, int] | None] = mapped_column(JsonColumn)
    # Size of the upload as received, in bytes.
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN ({_in_list(JobStatus)})", name="status"),
        # The claim query: oldest queued job first.
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        # The claim's fair share counts each queued job's tenant's running jobs; job creation
        # counts the tenant's active and queued ones.
        Index("ix_jobs_tenant_status", "tenant_id", "status"),
        # An active job reserves its adapter name; the database enforces it against races.
        Index(
            "uq_jobs_active_adapter_name",
            "tenant_id",
            "adapter_name",
            unique=True,
            sqlite_where=text(_ACTIVE_SQL),
            postgresql_where=text(_ACTIVE_SQL),
        ),
    )

    id: Mapped[str] = mapped_column(
        String(64), primary_key=True, default=lambda: ids.new_id(ids.JOB)
    )
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(32), default=JobStatus.VALIDATING_FILES)
    model: Mapped[str] = mapped_column(String(256))
    # {"type": "lora", "lora": {...params}}; hyperparameters are kept in their own column.
    method: Mapped[dict[str, Any]] = mapped_column(JsonColumn)
    # What the client sent; the worker adds what its run resolved (every setting as used,
    # the step plan and the validation split) once the trainer is set up.
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JsonColumn)
    resolved_hyperparameters: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)
    # What the request named that the job object echoes but training does not read, one plain
    # column each (null when the request did not use it, and on jobs created before 0008):
    # OpenAI's method type (supervised, dpo), which ``method`` maps onto LoRA, and the name of
    # the DPO reference adapter, which ``method`` pins by id.
    openai_method: Mapped[str | None] = mapped_column(String(16))
    reference_adapter_name: Mapped[str | None] = mapped_column(String(64))
    # Plain ids, not foreign keys: a job's history outlives a deleted dataset.
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    adapter_name: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    step: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    total_steps: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)
    # {"code", "message", "param"} once failed.
    error: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)
    fine_tuned_adapter: Mapped[str | None] = mapped_column(String(64))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    estimated_finish: Mapped[datetime | None] = mapped_column(UTCDateTime())
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Number of leases that expired (worker died or stalled) while running this job.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cancel_requested: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("false")
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    # Autoincrement so events have a total order per job (the pagination cursor).
    id: Mapped[int] = mapped_column(AutoIncrementId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(32), default="message")
    data: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_job_step", "job_id", "step"),)

    id: Mapped[str] = mapped_column(
        String(64), primary_key=True, default=lambda: ids.new_id(ids.CHECKPOINT)
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)
    # The resumable training state (opaque bytes from core). Old checkpoints keep their
    # metadata but drop this blob, which bounds storage per job.
    state: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AdapterRow(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_adapters_tenant_name"),)

    id: Mapped[str] = mapped_column(
        String(64), primary_key=True, default=lambda: ids.new_id(ids.ADAPTER)
    )
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(32))
    task: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column(JsonColumn)
    # safetensors bytes; only the serving bank and export ever load them.
    weights: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    label_names: Mapped[list[str] | None] = mapped_column(JsonColumn)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)
    trainable_params: Mapped[int] = mapped_column(BigInteger)
    trainable_pct: Mapped[float] = mapped_column(Float)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    base_model: Mapped[str] = mapped_column(String(256))
    base_fingerprint: Mapped[str] = mapped_column(String(128))
    source_job_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WorkerHeartbeat(Base):
    """One row per running worker process, refreshed every ``heartbeat_seconds``.

    Operational state, not tenant data (hence no ``tenant_id``): ``loraplex worker --check``,
    a worker container's health check, reads it (``service.worker.health``).
    """

    __tablename__ = "worker_heartbeats"

    # The worker id, as jobs record it in ``jobs.worker_id``.
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), index=True)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
