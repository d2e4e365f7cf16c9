"""Workers keep a heartbeat row, so a worker container has a health check.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

A worker serves no HTTP. Each worker process writes its row in ``worker_heartbeats`` every
``heartbeat_seconds`` and deletes it when it stops; ``loraplex worker --check`` reads it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "worker_heartbeats",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_worker_heartbeats")),
    )
    op.create_index(
        op.f("ix_worker_heartbeats_hostname"), "worker_heartbeats", ["hostname"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_worker_heartbeats_hostname"), table_name="worker_heartbeats")
    op.drop_table("worker_heartbeats")
