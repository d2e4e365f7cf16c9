"""``GET /v1/fine_tuning/jobs/{id}/events/stream`` (server-sent events) and the jobs filter.

Starlette's TestClient hands back a response once the app has finished it, so each stream
test lets a "worker" thread write events and finish the job while the request is open, then
reads the whole stream.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.api.routes import job_stream
from service.db.models import Job
from service.jobs import queue
from service.jobs.events import add_event
from service.jobs.outcomes import finish_failure
from service.state import app_state
from tests.service.helpers import Headers, assert_error, create_dataset, job_body

JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job_stream, "POLL_INTERVAL_S", 0.02)


def _job(client: TestClient, headers: Headers) -> str:
    resp = client.post(JOBS, json=job_body(create_dataset(client, headers)), headers=headers)
    assert resp.status_code == 200, resp.text
    job_id: str = resp.json()["id"]
    return job_id


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Blocks of ``field: value`` lines → [{"event", "id", "data", "comment", "retry"}]."""
    out: list[dict[str, Any]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        msg: dict[str, Any] = {}
        for line in block.split("\n"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "":
                msg["comment"] = value
            elif field == "data":
                msg["data"] = json.loads(value)
            else:
                msg[field] = value
        out.append(msg)
    return out


def _worker(
    db: sessionmaker[Session], job_id: str, *, delay: float = 0.3, steps: int = 3
) -> threading.Thread:
    """Claim the job, write metrics events one by one, then fail it (a terminal status)."""

    def run() -> None:
        time.sleep(delay)
        with db() as session:
            job = queue.claim_next_job(session, "w1", 30)
            assert job is not None and job.id == job_id
            session.commit()
        for step in range(1, steps + 1):
            time.sleep(0.05)
            with db() as session:
                job = session.get(Job, job_id)
                assert job is not None
                add_event(
                    session,
                    job,
                    f"Step {step}/{steps}",
                    type="metrics",
                    data={"step": step, "total_steps": steps, "train_loss": 1.0 / step},
                )
                session.commit()
            with db() as session:
                queue.report_progress(session, job_id, "w1", 30, step=step, total_steps=steps)
        with db() as session:
            job = session.get(Job, job_id)
            assert job is not None
            finish_failure(session, job, worker_id="w1", message="boom", code="x")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_stream_sends_old_then_new_events_and_ends_with_the_job(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    job_id = _job(client, auth)
    thread = _worker(db, job_id)
    resp = client.get(f"{JOBS}/{job_id}/events/stream", headers=auth)
    thread.join(5)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache"
    msgs = parse_sse(resp.text)

    assert msgs[0] == {"retry": str(job_stream.RETRY_MS)}
    assert msgs[1]["event"] == "job" and msgs[1]["data"]["status"] == "queued"
    assert msgs[-1] == {"event": "done", "data": {"status": "failed"}}

    events = [m for m in msgs if m.get("event") == "event"]
    listed = client.get(f"{JOBS}/{job_id}/events?order=asc&limit=100", headers=auth).json()
    # Every stored event, oldest first, exactly once, each with its id as the SSE id.
    assert [m["data"] for m in events] == listed["data"]
    assert [m["id"] for m in events] == [e["id"] for e in listed["data"]]
    messages = [m["data"]["message"] for m in events]
    assert messages[0].startswith("Validating training file")
    assert messages[1].startswith("Files validated; job queued")
    assert [m["data"]["data"]["train_loss"] for m in events if m["data"]["type"] == "metrics"] == [
        1.0,
        0.5,
        1.0 / 3,
    ]
    # The job object is re-sent as it changes: queued → running → progress → failed.
    statuses = [m["data"]["status"] for m in msgs if m.get("event") == "job"]
    assert statuses[0] == "queued" and statuses[-1] == "failed" and "running" in statuses
    steps = [m["data"]["progress"]["step"] for m in msgs if m.get("event") == "job"]
    assert steps == sorted(steps) and steps[-1] == 3


def test_stream_of_a_finished_job_replays_and_ends(
    client: TestClient, auth: Headers, db: sessionmaker[Session]
) -> None:
    job_id = _job(client, auth)
    assert client.post(f"{JOBS}/{job_id}/cancel", headers=auth).status_code == 200
    msgs = parse_sse(client.get(f"{JOBS}/{job_id}/events/stream", headers=auth).text)
    assert [m.get("event") for m in msgs] == [None, "job", "event", "event", "event", "done"]
    assert msgs[-1]["data"] == {"status": "cancelled"}
    assert msgs[-2]["data"]["message"] == "Job cancelled before it started"


def test_last_event_id_resumes_after_that_event(client: TestClient, auth: Headers) -> None:
    job_id = _job(client, auth)
    client.post(f"{JOBS}/{job_id}/cancel", headers=auth)
    events = client.get(f"{JOBS}/{job_id}/events?order=asc", headers=auth).json()["data"]
    assert len(events) == 3
    for how in (
        {"headers": {**auth, "Last-Event-ID": events[0]["id"]}},
        {"headers": auth, "params": {"after": events[1]["id"]}},
    ):
        msgs = parse_sse(client.get(f"{JOBS}/{job_id}/events/stream", **how).text)
        got = [m["id"] for m in msgs if m.get("event") == "event"]
        start = 1 if "Last-Event-ID" in how["headers"] else 2
        assert got == [e["id"] for e in events[start:]]
    resp = client.get(f"{JOBS}/{job_id}/events/stream", headers=auth, params={"after": "nope"})
    assert_error(resp, 422, code="invalid_cursor", param="after")


@pytest.mark.parametrize("cursor", ["ftevent-9223372036854775808", "ftevent-\u00b2"])
def test_a_cursor_no_event_can_have_is_422(client: TestClient, auth: Headers, cursor: str) -> None:
    """Past the database's signed 64-bit integers the id reached the driver (OverflowError:
    a 500, or a stream cut off by a traceback); '²' passed str.isdigit() and broke int()."""
    job_id = _job(client, auth)
    for url in (f"{JOBS}/{job_id}/events", f"{JOBS}/{job_id}/events/stream"):
        resp = client.get(url, headers=auth, params={"after": cursor})
        assert_error(resp, 422, code="invalid_cursor", param="after")


def test_an_overflowing_last_event_id_is_422_naming_the_header(
    client: TestClient, auth: Headers
) -> None:
    job_id = _job(client, auth)
    headers = {**auth, "Last-Event-ID": "ftevent-9223372036854775808"}
    resp = client.get(f"{JOBS}/{job_id}/events/stream", headers=headers)
    assert_error(resp, 422, code="invalid_cursor", param="Last-Event-ID")


def test_keep_alive_comments_while_nothing_happens(
    client: TestClient, auth: Headers, db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_stream, "KEEPALIVE_S", 0.05)
    job_id = _job(client, auth)
    thread = _worker(db, job_id, delay=0.4, steps=1)
    msgs = parse_sse(client.get(f"{JOBS}/{job_id}/events/stream", headers=auth).text)
    thread.join(5)
    assert {"comment": "keep-alive"} in msgs
    assert msgs[-1]["event"] == "done"


def test_stream_ends_after_its_maximum_lifetime(
    client: TestClient, auth: Headers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_stream, "MAX_STREAM_S", 0.1)
    job_id = _job(client, auth)  # stays queued: no worker here
    msgs = parse_sse(client.get(f"{JOBS}/{job_id}/events/stream", headers=auth).text)
    assert msgs[1]["event"] == "job" and "done" not in [m.get("event") for m in msgs]


def test_stream_ends_when_the_server_shuts_down(client: TestClient, auth: Headers) -> None:
    class Server:
        should_exit = False

    server = Server()
    app_state(client.app).uvicorn_server = server
    job_id = _job(client, auth)
    threading.Timer(0.2, lambda: setattr(server, "should_exit", True)).start()
    started = time.monotonic()
    msgs = parse_sse(client.get(f"{JOBS}/{job_id}/events/stream", headers=auth).text)
    assert time.monotonic() - started < 5
    assert "done" not in [m.get("event") for m in msgs]


def test_stream_ends_when_its_key_is_revoked_and_does_not_reopen(
    client: TestClient, admin: Headers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to go on sending events, key revoked or not, for its whole lifetime."""
    monkeypatch.setattr(job_stream, "MAX_STREAM_S", 10.0)
    created = client.post("/v1/tenants", json={"name": "leaver"}, headers=admin).json()
    key = created["api_key"]
    headers = {"Authorization": f"Bearer {key['key']}"}
    job_id = _job(client, headers)  # stays queued: no worker here
    revoke = f"/v1/tenants/{created['id']}/keys/{key['id']}"
    revoker = threading.Thread(target=lambda: client.delete(revoke, headers=admin))
    real_poll = job_stream._poll

    # The key goes once the stream has read its first snapshot (a timer raced a slow start).
    def poll_then_revoke(*args: Any) -> Any:
        snapshot = real_poll(*args)
        if revoker.ident is None:
            revoker.start()
        return snapshot

    monkeypatch.setattr(job_stream, "_poll", poll_then_revoke)
    msgs = parse_sse(client.get(f"{JOBS}/{job_id}/events/stream", headers=headers).text)
    revoker.join()
    assert msgs[1]["event"] == "job"
    assert msgs[-1]["event"] == "error"
    assert msgs[-1]["data"]["error"]["code"] == "revoked_api_key"
    assert "done" not in [m.get("event") for m in msgs]
    reconnect = client.get(
        f"{JOBS}/{job_id}/events/stream", headers={**headers, "Last-Event-ID": "ftevent-1"}
    )
    assert_error(reconnect, 401, code="revoked_api_key")


def test_stream_needs_a_key_and_hides_other_tenants_jobs(
    client: TestClient, auth: Headers, other_auth: Headers
) -> None:
    job_id = _job(client, auth)
    assert_error(client.get(f"{JOBS}/{job_id}/events/stream"), 401, code="missing_api_key")
    resp = client.get(f"{JOBS}/{job_id}/events/stream", headers=other_auth)
    assert_error(resp, 404, code="job_not_found")
    assert_error(
        client.get(f"{JOBS}/ftjob-nope/events/stream", headers=auth), 404, code="job_not_found"
    )


def test_jobs_list_filters_by_training_file(
    client: TestClient, auth: Headers, other_auth: Headers
) -> None:
    first, second = create_dataset(client, auth), create_dataset(client, auth)
    ids = {}
    for name, ds in (("a", first), ("b", second), ("c", first)):
        resp = client.post(JOBS, json=job_body(ds, adapter_name=name), headers=auth)
        ids[name] = resp.json()["id"]
    listed = client.get(JOBS, params={"training_file": first}, headers=auth).json()
    assert [j["id"] for j in listed["data"]] == [ids["c"], ids["a"]]
    page = client.get(JOBS, params={"training_file": first, "limit": 1}, headers=auth).json()
    assert [j["id"] for j in page["data"]] == [ids["c"]] and page["has_more"]
    rest = client.get(
        JOBS, params={"training_file": first, "after": page["last_id"]}, headers=auth
    ).json()
    assert [j["id"] for j in rest["data"]] == [ids["a"]] and not rest["has_more"]
    assert client.get(JOBS, params={"training_file": "ds-none"}, headers=auth).json()["data"] == []
    # Another tenant sees none of them, filter or not.
    theirs = client.get(JOBS, params={"training_file": first}, headers=other_auth).json()
    assert theirs["data"] == []
