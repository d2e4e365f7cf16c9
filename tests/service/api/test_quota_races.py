"""A tenant's parallel requests cannot overshoot its quotas.

Each quota is a count checked before an insert; without the tenant's row held from the
check to the commit (``service/tenants/lock.py``), requests that check at the same time all
see room: 20 parallel uploads stored 7 datasets where 5 fit. The requests here go through
the app's thread pool at once, as a client's parallel requests do.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient
from httpx import Response

from service.state import app_state
from tests.service.helpers import (
    CLASSIFICATION_ROWS,
    Headers,
    create_dataset,
    job_body,
    jsonl,
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
