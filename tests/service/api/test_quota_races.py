"""A tenant's parallel requests cannot overshoot its quotas.

Each quota is a count checked before an insert; without the tenant's row held from the
check to the commit (``service/tenants/lock.py``), requests that check at the same time all
see room: 20 parallel uploads stored 7 datasets where 5 fit. The requests here go through
the app's thread pool at once, as a client's parallel requests do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy.orm import Session, sessionmaker

from service.datasets.store import delete_owned_dataset
from service.db.models import Dataset, Job, JobStatus
from service.errors import ServiceError
from service.state import app_state
from service.tenants.lock import lock_tenant
from tests.service.helpers import (
    CLASSIFICATION_ROWS,
    Headers,
    create_dataset,
    job_body,
    jsonl,
    tenant_id_by_name,
    upload,
)

PARALLEL = 12


def _at_once(send: Callable[[int], Response]) -> list[int]:
    """The status codes of ``PARALLEL`` requests sent from as many threads."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        return sorted(resp.status_code for resp in pool.map(send, range(PARALLEL)))


def test_parallel_uploads_store_no_more_than_the_byte_quota(
    client: TestClient, auth: Headers, other_auth: Headers
) -> None:
    data = jsonl(CLASSIFICATION_ROWS)
    app_state(client.app).settings.max_dataset_bytes_per_tenant = 3 * len(data)
    codes = _at_once(lambda i: upload(client, auth, data, name=f"d{i}"))
    assert codes == [200] * 3 + [429] * (PARALLEL - 3)
    stored = client.get("/v1/datasets", headers=auth).json()["data"]
    assert sum(d["bytes"] for d in stored) == 3 * len(data)
    assert upload(client, other_auth, data).status_code == 200  # a quota per tenant


def test_parallel_job_creates_queue_no_more_than_the_queue_quota(
    client: TestClient, auth: Headers
) -> None:
    settings = app_state(client.app).settings
    settings.max_queued_jobs_per_tenant = 3
    train = create_dataset(client, auth)
    codes = _at_once(
        lambda i: client.post(
            "/v1/fine_tuning/jobs", json=job_body(train, adapter_name=f"a{i}"), headers=auth
        )
    )
    assert codes == [200] * 3 + [429] * (PARALLEL - 3)
    jobs = client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"]
    assert [job["status"] for job in jobs] == ["queued"] * 3


def test_parallel_job_creates_take_no_more_than_the_adapter_quota(
    client: TestClient, auth: Headers
) -> None:
    settings = app_state(client.app).settings
    settings.max_adapters_per_tenant = 2  # a job counts as the adapter it will make
    train = create_dataset(client, auth)
    codes = _at_once(
        lambda i: client.post(
            "/v1/fine_tuning/jobs", json=job_body(train, adapter_name=f"a{i}"), headers=auth
        )
    )
    assert codes == [200] * 2 + [429] * (PARALLEL - 2)


def test_a_dataset_delete_waits_for_a_job_create_that_holds_the_tenant(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    """Job creation holds the tenant's lock from reading its files to its commit. A delete that
    did not take it passed its in-use check while the create was reading the file, and the
    job queued on a deleted file (7 of 30 raced pairs across two API processes)."""
    dataset_id = create_dataset(client, auth)
    tenant_id = tenant_id_by_name(db)
    outcome: list[BaseException | None] = []

    def delete() -> None:
        with db() as session:
            row = session.get(Dataset, dataset_id)
            assert row is not None
            try:
                delete_owned_dataset(session, row)
                outcome.append(None)
            except ServiceError as exc:
                outcome.append(exc)

    with db() as creating:  # a create between its lock and its commit
        lock_tenant(creating, tenant_id)
        creating.add(
            Job(
                tenant_id=tenant_id,
                status=JobStatus.QUEUED,
                model="m",
                method={"type": "lora", "lora": {}},
                hyperparameters={},
                training_file=dataset_id,
                adapter_name="racer",
                seed=1,
            )
        )
        creating.flush()
        deleting = threading.Thread(target=delete)
        deleting.start()
        time.sleep(0.5)  # for the delete to reach its check (it waits on the lock)
        creating.commit()
    deleting.join(30)
    (error,) = outcome
    assert isinstance(error, ServiceError) and error.code == "dataset_in_use"
    with db() as session:
        assert session.get(Dataset, dataset_id) is not None
