"""A job's event log: the lines ``GET /v1/fine_tuning/jobs/{id}/events`` lists.

``add_event`` joins the caller's transaction, so an event commits together with the change it
tells of. A worker's own events go through ``queue.add_owned_event``, which writes them only
while that worker holds the job's lease.
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy.orm import Session

from service.db.models import Job, JobEvent

# OpenAI's values, the only ones the SDK's event type takes ("warning" and "checkpoint", which
# loraplex once wrote, fail it; migration 0009 rewrote them).
EventLevel = Literal["info", "warn", "error"]
EventType = Literal["message", "metrics"]


def add_event(
    session: Session,
    job: Job,
    message: str,
    *,
    level: EventLevel = "info",
    type: EventType = "message",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    """Add an event to the caller's transaction (no commit)."""
    event = JobEvent(
        job_id=job.id, tenant_id=job.tenant_id, message=message, level=level, type=type, data=data
    )
    session.add(event)
    return event
