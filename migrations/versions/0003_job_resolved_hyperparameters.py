"""Jobs keep the hyperparameters their run resolved.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

``jobs.hyperparameters`` stays what the client sent; ``jobs.resolved_hyperparameters`` is
written by the worker once the trainer is set up: "auto" and defaults replaced by the values
used (learning rate, batch size, epochs, warm-up steps, ...) plus the plan (total steps, the
validation split and how many training rows it held out). NULL until a worker starts the job.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("resolved_hyperparameters", sa.JSON(none_as_null=True)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("resolved_hyperparameters")
