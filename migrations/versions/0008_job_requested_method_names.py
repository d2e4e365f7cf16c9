"""Jobs keep the OpenAI method type and the reference adapter name they were created with.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

``jobs.method`` holds what training reads: OpenAI's ``supervised`` and ``dpo`` mapped onto
LoRA, a DPO reference adapter pinned by id. The job object echoes what the client sent, so two
nullable columns keep it: ``jobs.openai_method`` (``supervised`` or ``dpo``) and
``jobs.reference_adapter_name``. Jobs created before have neither (null) and echo as they did.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("openai_method", sa.String(length=16)))
        batch.add_column(sa.Column("reference_adapter_name", sa.String(length=64)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("reference_adapter_name")
        batch.drop_column("openai_method")
