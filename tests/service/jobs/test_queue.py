"""The database job queue: atomic claims, leases, requeue, checkpoints, outcomes."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import AdapterRow, Checkpoint, Job, JobEvent, JobStatus, Tenant
from service.db.types import utcnow
from service.jobs import checkpoints, outcomes, queue
from tests.service.helpers import adapter_row, add_queued_job, add_tenant

Factory = sessionmaker[Session]


def _get(db: Factory, job_id: str) -> Job:
    with db() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _events(db: Factory, job_id: str) -> list[str]:
    with db() as session:
        return list(
            session.scalars(
                select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            )
        )


def _levels(db: Factory, job_id: str) -> dict[str, str]:
    """Each event's level by its message."""
    with db() as session:
        rows = session.execute(
            select(JobEvent.message, JobEvent.level).where(JobEvent.job_id == job_id)
        ).all()
    return {message: level for message, level in rows}


def test_claim_takes_oldest_queued_job(migrated_db: Factory) -> None:
    tenant = add_tenant(migrated_db)
    first = add_queued_job(migrated_db, tenant, "a")
    second = add_queued_job(migrated_db, tenant, "b")
    with migrated_db() as session:
        job = queue.claim_next_job(session, "w1", 30)
        assert job is not None and job.id == first
        assert job.status == JobStatus.RUNNING and job.worker_id == "w1"
        assert job.started_at is not None and job.lease_expires_at is not None
        assert job.lease_expires_at > utcnow() + timedelta(seconds=25)
        job2 = queue.claim_next_job(session, "w2", 30)
        assert job2 is not None and job2.id == second
        assert queue.claim_next_job(session, "w3", 30) is None
    assert _events(migrated_db, first) == ["Job started on worker w1"]


def test_claim_shares_workers_fairly_between_tenants(migrated_db: Factory) -> None:
    # A queued four jobs and one of them runs; B queued one later. B's goes next (A has a job
    # running, B none), then A's in the order A queued them.
    a, b = add_tenant(migrated_db, "a"), add_tenant(migrated_db, "b")
    a_jobs = [add_queued_job(migrated_db, a, f"a{i}") for i in range(4)]
    b_job = add_queued_job(migrated_db, b, "b0")
    order: list[str] = []
    with migrated_db() as session:
        while (job := queue.claim_next_job(session, f"w{len(order)}", 30)) is not None:
            order.append(job.id)
    assert order == [a_jobs[0], b_job, *a_jobs[1:]]


def test_one_worker_alternates_between_tenants_as_jobs_end(migrated_db: Factory) -> None:
    # One worker (the embedded default): when A's job ends, both tenants run 0 jobs. B's one
    # job, queued after all of A's, goes next because A was served last; then A's, oldest first.
    a, b = add_tenant(migrated_db, "a"), add_tenant(migrated_db, "b")
    a_jobs = [add_queued_job(migrated_db, a, f"a{i}") for i in range(3)]
    b_job = add_queued_job(migrated_db, b, "b0")
    order: list[str] = []
    with migrated_db() as session:
        while (job := queue.claim_next_job(session, "w1", 30)) is not None:
            order.append(job.id)
            job.status = JobStatus.SUCCEEDED  # ends before the worker claims again
            session.commit()
    assert order == [a_jobs[0], b_job, *a_jobs[1:]]


def test_claim_prefers_the_tenant_with_fewer_running_jobs_then_the_oldest(
    migrated_db: Factory,
) -> None:
    a, b, c = (add_tenant(migrated_db, name) for name in "abc")
    a_running = [add_queued_job(migrated_db, a, f"a{i}") for i in range(2)]
    b_running = add_queued_job(migrated_db, b, "b0")
    with migrated_db() as session:
        for i in range(3):
            assert queue.claim_next_job(session, f"w{i}", 30) is not None
    # Running now: A 2, B 1, C 0. Queued oldest first: A, B, C.
    a_next = add_queued_job(migrated_db, a, "a2")
    b_next = add_queued_job(migrated_db, b, "b1")
    c_next = add_queued_job(migrated_db, c, "c0")
    with migrated_db() as session:
        claimed = [queue.claim_next_job(session, f"x{i}", 30) for i in range(3)]
    assert [job.id for job in claimed if job is not None] == [c_next, b_next, a_next]
    assert {_get(migrated_db, j).status for j in [*a_running, b_running]} == {JobStatus.RUNNING}


def test_two_sessions_race_for_one_job_exactly_one_wins(migrated_db: Factory) -> None:
    tenant = add_tenant(migrated_db)
    job_id = add_queued_job(migrated_db, tenant)
    n_workers = 8
    barrier = threading.Barrier(n_workers)
    results: list[str | None] = [None] * n_workers
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with migrated_db() as session:
                barrier.wait()
                job = queue.claim_next_job(session, f"w{i}", 30)
                results[i] = job.id if job else None
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    winners = [i for i, r in enumerate(results) if r is not None]
    assert len(winners) == 1 and results[winners[0]] == job_id
    job = _get(migrated_db, job_id)
    assert job.worker_id == f"w{winners[0]}"
    assert _events(migrated_db, job_id) == [f"Job started on worker w{winners[0]}"]


def test_race_with_two_jobs_gives_each_to_one_worker(migrated_db: Factory) -> None:
    tenant = add_tenant(migrated_db)
    jobs = {add_queued_job(migrated_db, tenant, "a"), add_queued_job(migrated_db, tenant, "b")}
    barrier = threading.Barrier(4)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        with migrated_db() as session:
            barrier.wait()
            job = queue.claim_next_job(session, f"w{i}", 30)
            if job is not None:
                with lock:
                    claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(claimed) == sorted(jobs)


def test_heartbeat_extends_lease_and_reports_loss(migrated_db: Factory) -> None:
    job_id = add_queued_job(migrated_db, add_tenant(migrated_db))
    with migrated_db() as session:
        job = queue.claim_next_job(session, "w1", 1)
        assert job is not None
        before = _get(migrated_db, job_id).lease_expires_at
        assert queue.heartbeat(session, job_id, "w1", 60)
        after = _get(migrated_db, job_id).lease_expires_at
        assert before is not None and after is not None and after > before
        assert not queue.heartbeat(session, job_id, "intruder", 60)


def test_expired_lease_is_requeued_with_an_attempt_and_event(migrated_db: Factory) -> None:
    job_id = add_queued_job(migrated_db, add_tenant(migrated_db))
    with migrated_db() as session:
        assert queue.claim_next_job(session, "w1", 30) is not None
        # Not expired yet: nothing happens.
        assert queue.requeue_expired(session) == []
        later = utcnow() + timedelta(seconds=31)
        assert queue.requeue_expired(session, now=later) == [job_id]
    job = _get(migrated_db, job_id)
    assert job.status == JobStatus.QUEUED and job.attempts == 1
    assert job.worker_id is None and job.lease_expires_at is None
    # OpenAI's levels are info, warn and error: "warning" failed the SDK's event type.
    assert _levels(migrated_db, job_id)["Worker lost (lease expired); job requeued, retry 1"] == (
        "warn"
    )
    with migrated_db() as session:
        # The old worker's lease is gone: its heartbeat fails and it may not finish the job.
        assert not queue.heartbeat(session, job_id, "w1", 30)
        with pytest.raises(queue.LeaseLostError):
            outcomes.finish_failure(session, _get(migrated_db, job_id), worker_id="w1", message="x")
        # Another worker picks it up again.
        job2 = queue.claim_next_job(session, "w2", 30)
        assert job2 is not None and job2.id == job_id and job2.attempts == 1
    assert _events(migrated_db, job_id)[-1] == "Job started on worker w2 (retry 1)"


def test_heartbeat_keeps_a_job_from_being_requeued(migrated_db: Factory) -> None:
    job_id = add_queued_job(migrated_db, add_tenant(migrated_db))
    with migrated_db() as session:
        assert queue.claim_next_job(session, "w1", 30) is not None
        soon = utcnow() + timedelta(seconds=31)
        assert queue.heartbeat(session, job_id, "w1", 60, now=utcnow() + timedelta(seconds=20))
        assert queue.requeue_expired(session, now=soon) == []
    assert _get(migrated_db, job_id).status == JobStatus.RUNNING


def test_job_failed_after_max_attempts(migrated_db: Factory) -> None:
    job_id = add_queued_job(migrated_db, add_tenant(migrated_db), attempts=2)
    with migrated_db() as session:
        assert queue.claim_next_job(session, "w1", 30) is not None
        later = utcnow() + timedelta(minutes=5)
        assert queue.requeue_expired(session, max_attempts=3, now=later) == []
    job = _get(migrated_db, job_id)
    assert job.status == JobStatus.FAILED and job.attempts == 3
    assert job.error is not None and job.error["code"] == "worker_lost"
    assert job.finished_at is not None


def test_expired_cancel_requested_job_is_cancelled(migrated_db: Factory) -> None:
    job_id = add_queued_job(migrated_db, add_tenant(migrated_db))
    with migrated_db() as session:
        assert queue.claim_next_job(session, "w1", 30) is not None
        job = session.get(Job, job_id)
        assert job is not None
        job.status, job.cancel_requested = JobStatus.CANCEL_REQUESTED, True
        session.commit()
        queue.requeue_expired(session, now=utcnow() + timedelta(minutes=5))
    assert _get(migrated_db, job_id).status == JobStatus.CANCELLED
    assert _levels(migrated_db, job_id)["Worker lost while cancelling; job cancelled"] == "warn"


def test_finish_success_writes_adapter_and_job_together(migrated_db: Factory) -> None:
    tenant = add_tenant(migrated_db)
    job_id = add_queued_job(migrated_db, tenant, "sentiment", metrics={"val_accuracy": 0.91})
    with migrated_db() as session:
        job = queue.claim_next_job(session, "w1", 30)
        assert job is not None
        adapter = outcomes.finish_success(
            session, job, adapter_row(tenant, "", version=None, metrics=None), worker_id="w1"
        )
        assert adapter.name == "sentiment" and adapter.version == 1
        assert adapter.source_job_id == job_id and adapter.metrics == {"val_accuracy": 0.91}
        assert job.status == JobStatus.SUCCEEDED  # the caller's object is refreshed
    job = _get(migrated_db, job_id)
    assert job.fine_tuned_adapter == "sentiment" and job.finished_at is not None
    assert job.lease_expires_at is None
    assert _events(migrated_db, job_id)[-1] == "Job succeeded: adapter 'sentiment' version 1"


def test_adapter_versions_are_never_reused(migrated_db: Factory) -> None:
    tenant = add_tenant(migrated_db)
    versions = []
    for _ in range(2):
        add_queued_job(migrated_db, tenant, "same")
        with migrated_db() as session:
            job = queue.claim_next_job(session, "w1", 30)
            assert job is not None
            adapter = outcomes.finish_success(
                session, job, adapter_row(tenant, "", version=None), worker_id="w1"
            )
            versions.append(adapter.version)
            session.delete(adapter)  # the user deletes it, then trains the name again
            session.commit()
    assert versions == [1, 2]


def test_finish_success_is_atomic_when_adapter_insert_fails(migrated_db: Factory) -> None:
    tenant = add_tenant(migrated_db)
    job_id = add_queued_job(migrated_db, tenant, "clash")
    with migrated_db() as session:
        # An adapter with the same name appeared while the job ran (e.g. an import).
        session.add(adapter_row(tenant, "clash", weights=b"ORIGINAL"))
        session.commit()
        job = queue.claim_next_job(session, "w1", 30)
        assert job is not None
        with pytest.raises(IntegrityError):
            outcomes.finish_success(
                session, job, adapter_row(tenant, "", version=None), worker_id="w1"
            )
    job = _get(migrated_db, job_id)
    assert job.status == JobStatus.RUNNING and job.fine_tuned_adapter is None
    assert job.finished_at is None and job.worker_id == "w1"
    assert not any("succeeded" in m for m in _events(migrated_db, job_id))
    with migrated_db() as session:
        assert session.scalar(select(func.count()).select_from(AdapterRow)) == 1
        assert session.scalar(select(Tenant.adapter_seq)) == 0  # the version bump rolled back
        # The worker can still record the failure: it kept its lease.
        outcomes.finish_failure(
            session,
            _get(migrated_db, job_id),
            worker_id="w1",
            message="name taken",
            code="adapter_name_conflict",
        )
    job = _get(migrated_db, job_id)
    assert job.status == JobStatus.FAILED
    assert job.error == {"code": "adapter_name_conflict", "message": "name taken", "param": None}


def test_finish_success_after_lease_loss_writes_nothing(migrated_db: Factory) -> None:
    tenant = add_tenant(migrated_db)
    job_id = add_queued_job(migrated_db, tenant)
    with migrated_db() as session:
        job = queue.claim_next_job(session, "w1", 30)
        assert job is not None
        queue.requeue_expired(session, now=utcnow() + timedelta(minutes=1))
        with pytest.raises(queue.LeaseLostError):
            outcomes.finish_success(
                session, job, adapter_row(tenant, "", version=None), worker_id="w1"
            )
        assert session.scalar(select(func.count()).select_from(AdapterRow)) == 0
    assert _get(migrated_db, job_id).status == JobStatus.QUEUED


def test_finish_cancelled(migrated_db: Factory) -> None:
    job_id = add_queued_job(migrated_db, add_tenant(migrated_db))
    with migrated_db() as session:
        job = queue.claim_next_job(session, "w1", 30)
        assert job is not None
        outcomes.finish_cancelled(session, job, worker_id="w1")
        assert job.status == JobStatus.CANCELLED and job.finished_at is not None
    assert _get(migrated_db, job_id).status == JobStatus.CANCELLED
    assert _events(migrated_db, job_id)[-1] == "Job cancelled"


def test_record_training_plan_stores_it_only_under_the_lease(migrated_db: Factory) -> None:
    job_id = add_queued_job(migrated_db, add_tenant(migrated_db))
    resolved = {"batch_size": 16, "total_steps": 12, "held_out_examples": 3}
    with migrated_db() as session:
        job = queue.claim_next_job(session, "w1", 30)
        assert job is not None
        queue.record_training_plan(
            session, job, worker_id="w1", resolved=resolved, message="Training", data={"a": 1}
        )
        with pytest.raises(queue.LeaseLostError):
            queue.record_training_plan(
                session, job, worker_id="w2", resolved={"total_steps": 1}, message="stale"
            )
    job = _get(migrated_db, job_id)
    assert job.resolved_hyperparameters == resolved and job.total_steps == 12
    assert _events(migrated_db, job_id)[-1] == "Training"


def test_cancelled_event_names_the_step_of_the_jobs_progress(migrated_db: Factory) -> None:
    job_id = add_queued_job(migrated_db, add_tenant(migrated_db))
    with migrated_db() as session:
        assert queue.claim_next_job(session, "w1", 30) is not None
        assert queue.report_progress(session, job_id, "w1", 30, step=7, total_steps=20, epoch=1.4)
        job = session.get(Job, job_id)
        assert job is not None
        outcomes.finish_cancelled(session, job, worker_id="w1")
    with migrated_db() as session:
        event = session.scalars(select(JobEvent).order_by(JobEvent.id.desc())).first()
        assert event is not None and event.message == "Job cancelled at step 7/20"
        assert event.data == {"step": 7, "total_steps": 20, "epoch": 1.4}


def _claimed_with_an_estimate(db: Factory, job_id: str) -> Job:
    with db() as session:
        job = queue.claim_next_job(session, "w1", 30)
        assert job is not None
        finish = utcnow() + timedelta(minutes=3)
        assert queue.report_progress(
            session, job_id, "w1", 30, step=7, total_steps=20, estimated_finish=finish
        )
    assert _get(db, job_id).estimated_finish is not None
    return job


def test_release_job_requeues_without_an_attempt_or_estimate(migrated_db: Factory) -> None:
    job_id = add_queued_job(migrated_db, add_tenant(migrated_db))
    job = _claimed_with_an_estimate(migrated_db, job_id)
    with migrated_db() as session:
        assert queue.release_job(session, job, worker_id="w1", reason="shutdown")
    job = _get(migrated_db, job_id)
    assert job.status == JobStatus.QUEUED and job.attempts == 0
    assert _levels(migrated_db, job_id)["Job requeued: shutdown"] == "warn"
    # A queued job has no finish to expect: the estimate was the stopped worker's.
    assert job.estimated_finish is None


def test_a_requeue_after_a_lost_lease_drops_the_estimate(migrated_db: Factory) -> None:
    job_id = add_queued_job(migrated_db, add_tenant(migrated_db))
    _claimed_with_an_estimate(migrated_db, job_id)
    with migrated_db() as session:
        later = utcnow() + timedelta(seconds=31)
        assert queue.requeue_expired(session, now=later) == [job_id]
    job = _get(migrated_db, job_id)
    assert job.status == JobStatus.QUEUED and job.estimated_finish is None


def test_checkpoints_keep_only_recent_states(migrated_db: Factory) -> None:
    job_id = add_queued_job(migrated_db, add_tenant(migrated_db))
    with migrated_db() as session:
        job = queue.claim_next_job(session, "w1", 30)
        assert job is not None
        assert checkpoints.latest_checkpoint(session, job_id) is None
        for step in (10, 20, 30):
            checkpoints.save_checkpoint(
                session,
                job,
                worker_id="w1",
                step=step,
                state=f"state-{step}".encode(),
                epoch=step / 30,
                metrics={"loss": 1.0 / step},
                keep_states=2,
            )
        latest = checkpoints.latest_checkpoint(session, job_id)
        assert latest is not None and latest.step == 30 and latest.state == b"state-30"
        states = dict(
            session.execute(
                select(Checkpoint.step, Checkpoint.state).order_by(Checkpoint.step)
            ).all()
        )
        assert states == {10: None, 20: b"state-20", 30: b"state-30"}
        # The job's progress is its progress writes' (step, epoch and tokens together).
        assert _get(migrated_db, job_id).step == 0
        with pytest.raises(queue.LeaseLostError):
            checkpoints.save_checkpoint(session, job, worker_id="other", step=40, state=b"x")
        assert session.scalar(select(func.count()).select_from(Checkpoint)) == 3
        # Announced as OpenAI's checkpoint messages are: type "message" (the SDK's event type
        # has no "checkpoint"), what a program needs in data.
        saved = session.execute(
            select(JobEvent.message, JobEvent.type, JobEvent.data)
            .where(JobEvent.job_id == job_id, JobEvent.message.like("Checkpoint%"))
            .order_by(JobEvent.id)
        ).all()
        ids = dict(session.execute(select(Checkpoint.step, Checkpoint.id)).all())
        assert [tuple(row) for row in saved] == [
            (
                f"Checkpoint created at step {step}",
                "message",
                {"checkpoint_id": ids[step], "step": step, "epoch": step / 30},
            )
            for step in (10, 20, 30)
        ]
