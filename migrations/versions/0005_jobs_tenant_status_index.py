"""Index jobs by (tenant, status) for the fair-share claim and the per-tenant job quotas.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

The claim orders queued jobs by how many jobs their tenant has running (a correlated count per
candidate); job creation counts a tenant's active and queued jobs. Both read this index instead
of every job the tenant ever ran.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_tenant_status", "jobs", ["tenant_id", "status"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_status", table_name="jobs")
