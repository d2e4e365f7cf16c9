"""A worker that lost its lease writes nothing: events are fenced like checkpoints and outcomes.

The end-to-end version (a worker SIGSTOPped past its lease, then SIGCONTed) is in
``tests/e2e/test_faults.py``; this is the queue-level contract it relies on.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import Job
from service.db.types import utcnow
from service.jobs import outcomes, queue
from tests.service.helpers import add_queued_job, add_tenant
from tests.service.jobs.test_queue import _events

Factory = sessionmaker[Session]


def _claimed(db: Factory, worker_id: str) -> Job:
    tenant = add_tenant(db)
    add_queued_job(db, tenant)
    with db() as session:
        job = queue.claim_next_job(session, worker_id, 30)
        assert job is not None
        session.expunge(job)
    return job


def test_holder_writes_events(migrated_db: Factory) -> None:
    job = _claimed(migrated_db, "w1")
    with migrated_db() as session:
        queue.add_owned_event(session, job, worker_id="w1", message="Step 1/2", type="metrics")
    assert _events(migrated_db, job.id)[-1] == "Step 1/2"


def test_stale_worker_cannot_write_events_after_requeue(migrated_db: Factory) -> None:
    job = _claimed(migrated_db, "stale")
    later = utcnow() + timedelta(seconds=60)
    with migrated_db() as session:  # the lease expired; a reaper requeues, w2 claims
        assert queue.requeue_expired(session, now=later) == [job.id]
        assert queue.claim_next_job(session, "w2", 30, now=later) is not None
    before = _events(migrated_db, job.id)
    with migrated_db() as session, pytest.raises(queue.LeaseLostError):
        queue.add_owned_event(session, job, worker_id="stale", message="Step 7/24")
    assert _events(migrated_db, job.id) == before
    with migrated_db() as session:  # the new holder still can
        queue.add_owned_event(session, job, worker_id="w2", message="Step 5/24")
    assert _events(migrated_db, job.id)[-1] == "Step 5/24"


def test_no_events_after_the_job_finished(migrated_db: Factory) -> None:
    job = _claimed(migrated_db, "w1")
    with migrated_db() as session:
        outcomes.finish_cancelled(session, session.get(Job, job.id), worker_id="w1")  # type: ignore[arg-type]
    with migrated_db() as session, pytest.raises(queue.LeaseLostError):
        queue.add_owned_event(session, job, worker_id="w1", message="late")
    assert _events(migrated_db, job.id)[-1] == "Job cancelled"
