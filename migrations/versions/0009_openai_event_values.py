"""Job events stored with OpenAI's level and type values.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08

OpenAI's event levels are ``info``, ``warn`` and ``error``, its types ``message`` and
``metrics``; the SDK's ``FineTuningJobEvent`` refuses anything else. Events were written with
the level ``warning`` (requeues, lost workers, an unusable checkpoint) and a checkpoint's with
the type ``checkpoint``: the upgrade rewrites them as ``warn`` and ``message`` (a checkpoint
event keeps its ``data``: checkpoint_id, step, epoch), and a checkpoint's text as OpenAI's and
the code's now, "Checkpoint created at step N" (it was "saved"). The downgrade gives them back:
no event was ``warn`` before, and a checkpoint's event is told by its message.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What save_checkpoint wrote before (type checkpoint) and writes now (type message); the
# step follows each prefix.
_SAVED, _CREATED = "Checkpoint saved at step ", "Checkpoint created at step "


def upgrade() -> None:
    op.execute(sa.text("UPDATE job_events SET level = 'warn' WHERE level = 'warning'"))
    op.execute(
        sa.text(
            f"UPDATE job_events SET type = 'message', message = '{_CREATED}' || "
            f"substr(message, {len(_SAVED) + 1}) "
            f"WHERE type = 'checkpoint' AND message LIKE '{_SAVED}%'"
        )
    )
    op.execute(sa.text("UPDATE job_events SET type = 'message' WHERE type = 'checkpoint'"))


def downgrade() -> None:
    op.execute(sa.text("UPDATE job_events SET level = 'warning' WHERE level = 'warn'"))
    op.execute(
        sa.text(
            f"UPDATE job_events SET type = 'checkpoint', message = '{_SAVED}' || "
            f"substr(message, {len(_CREATED) + 1}) "
            f"WHERE type = 'message' AND message LIKE '{_CREATED}%'"
        )
    )
