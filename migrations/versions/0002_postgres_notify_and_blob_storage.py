"""PostgreSQL: NOTIFY on adapter changes; store large blobs uncompressed, out of line.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

Every API replica LISTENs on the channel (``service.serving.invalidation``) and drops its
resident copies of the named adapter. A trigger rather than application code, so that every
path that changes an adapter (delete, replace, import, a finished job, a tenant's cascade
delete, a hand-written SQL fix) notifies, always inside the writing transaction: PostgreSQL
delivers a notification only when (and if) that transaction commits.

Payload: ``<tenant_id>/<name>/<version>/<op>`` (tenant ids and adapter names never hold '/'),
``op`` = ``delete`` (that version is gone: a delete, or the old side of an update) or
``insert`` (that version is now the live one: older versions of the name are stale). An
update sends both.

Blobs: adapter weights and checkpoint states are float tensors and dataset rows are already
gzip-compressed; none of them shrinks under TOAST's compression (weights: -8 % with zlib), so
``STORAGE EXTERNAL`` keeps them out of line without the compression attempt on every write and
the decompression on every read. The type stays ``bytea``.

SQLite has no NOTIFY and no storage modes; this revision does nothing there (one box).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "loraplex_adapters"

CREATE_FUNCTION = f"""
CREATE OR REPLACE FUNCTION loraplex_notify_adapter_change() RETURNS trigger AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify(
            '{CHANNEL}', OLD.tenant_id || '/' || OLD.name || '/' || OLD.version || '/delete');
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pg_notify(
            '{CHANNEL}', NEW.tenant_id || '/' || NEW.name || '/' || NEW.version || '/insert');
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""

CREATE_TRIGGER = """
CREATE TRIGGER adapters_notify_change
AFTER INSERT OR UPDATE OR DELETE ON adapters
FOR EACH ROW EXECUTE FUNCTION loraplex_notify_adapter_change()
"""


BLOBS = (("adapters", "weights"), ("checkpoints", "state"), ("datasets", "rows"))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(CREATE_FUNCTION)
    op.execute(CREATE_TRIGGER)
    for table, column in BLOBS:
        op.execute(f'ALTER TABLE {table} ALTER COLUMN "{column}" SET STORAGE EXTERNAL')


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in BLOBS:
        op.execute(f'ALTER TABLE {table} ALTER COLUMN "{column}" SET STORAGE EXTENDED')
    op.execute("DROP TRIGGER IF EXISTS adapters_notify_change ON adapters")
    op.execute("DROP FUNCTION IF EXISTS loraplex_notify_adapter_change()")
