"""``GET /v1/fine_tuning/jobs/{id}/events/stream``: a job's events as server-sent events.

The stream sends, in order:

- ``retry: 2000`` (how long a client waits before reconnecting);
- ``event: job`` with the job object, again whenever it changes (status, progress, metrics);
- ``event: event`` for every stored event, oldest first, then each new one as the worker
  writes it; its SSE ``id`` is the event's id, so a reconnecting client that sends
  ``Last-Event-ID`` (or ``?after=``) gets only what it has not seen;
- ``event: done`` with ``{"status": ...}`` once the job is finished (succeeded, failed or
  cancelled) and every event before that has been sent; then the stream ends;
- ``event: error`` with the standard error body (``revoked_api_key``) if the key that opened
  the stream is revoked meanwhile (checked on every poll); then the stream ends, and the
  client's reconnect is refused like any request with that key.

The server polls the database every :data:`POLL_INTERVAL_S` (in a thread, with a short-lived
session each time) and sends a comment line every :data:`KEEPALIVE_S` so idle proxies keep the
connection. A stream also ends when the client goes away, when the server begins to shut down
(so an open dashboard never holds up a graceful stop), and after :data:`MAX_STREAM_S` (the
client reconnects with ``Last-Event-ID`` and loses nothing).

Browsers' ``EventSource`` cannot send an ``Authorization`` header; read the stream with
``fetch()`` instead (the dashboard does). Keys never go in URLs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.api.deps import CurrentTenant, PrincipalDep, SessionDep, SessionFactoryDep
from service.api.errors import AUTHENTICATION, error_body
from service.api.params import JobId
from service.api.schemas.job_events import JobEventObject, parse_event_id
from service.api.schemas.jobs import JobObject
from service.db.models import TERMINAL_STATUSES, ApiKey, Job, JobEvent
from service.errors import invalid, not_found
from service.state import app_state

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

POLL_INTERVAL_S = 0.5
KEEPALIVE_S = 15.0
MAX_STREAM_S = 600.0
RETRY_MS = 2000
# Events read per poll; a fuller batch is followed by another read at once.
BATCH = 500

# What a request with a revoked key is answered (as a 401), sent as the stream's last event.
_REVOKED = error_body("This API key has been revoked.", AUTHENTICATION, None, "revoked_api_key")


class _Snapshot(BaseModel):
    job: JobObject | None
    events: list[JobEventObject]
    last_id: int
    key_revoked: bool = False


def _poll(
    factory: sessionmaker[Session], job_id: str, after_id: int, key_id: str | None
) -> _Snapshot:
    """The job, then its events after ``after_id``, in one short transaction; first whether
    the stream's key (``key_id``; None where no key was looked up) still stands.

    The job is read first: once it shows a final status, the events read after it include
    every event committed before (or with) that status.
    """
    with factory() as session:
        if key_id is not None:
            # By primary key: cheap enough for every poll. A deleted tenant takes its keys.
            key = session.get(ApiKey, key_id)
            if key is None or key.revoked_at is not None:
                return _Snapshot(job=None, events=[], last_id=after_id, key_revoked=True)
        job = session.get(Job, job_id)
        if job is None:  # deleted meanwhile
            return _Snapshot(job=None, events=[], last_id=after_id)
        job_obj = JobObject.from_row(job)
        rows = list(
            session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
                .order_by(JobEvent.id.asc())
                .limit(BATCH)
            )
        )
        last_id = rows[-1].id if rows else after_id
        return _Snapshot(
            job=job_obj, events=[JobEventObject.from_row(r) for r in rows], last_id=last_id
        )


def _sse(event: str, data: Any, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _server_exiting(request: Request) -> bool:
    # ``loraplex serve`` keeps its uvicorn server here; uvicorn waits for open responses
    # before it runs the lifespan shutdown, so a stream must notice and end by itself.
    server = app_state(request).uvicorn_server
    return server is not None and server.should_exit


async def _stream(
    request: Request,
    factory: sessionmaker[Session],
    job_id: str,
    after_id: int,
    key_id: str | None,
) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    started = last_sent = time.monotonic()
    last_job: dict[str, Any] | None = None
    while True:
        snap = await run_in_threadpool(_poll, factory, job_id, after_id, key_id)
        if snap.key_revoked:
            yield _sse("error", _REVOKED)
            return
        if snap.job is None:
            yield _sse("done", {"status": "deleted"})
            return
        job = snap.job.model_dump(mode="json")
        if job != last_job:
            last_job = job
            yield _sse("job", job)
            last_sent = time.monotonic()
        for ev in snap.events:
            yield _sse("event", ev.model_dump(mode="json"), ev.id)
            last_sent = time.monotonic()
        after_id = snap.last_id
        if len(snap.events) == BATCH:
            continue  # more are waiting
        if snap.job.status in TERMINAL_STATUSES:
            yield _sse("done", {"status": snap.job.status})
            return
        now = time.monotonic()
        if now - started >= MAX_STREAM_S or _server_exiting(request):
            return
        if now - last_sent >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = now
        if await request.is_disconnected():
            return
        await asyncio.sleep(POLL_INTERVAL_S)


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    summary="Stream a job's events",
    responses={
        200: {
            "description": "Server-sent events.",
            "content": {
                "text/event-stream": {
                    "example": 'retry: 2000\n\nevent: event\nid: ftevent-12\ndata: {"object": '
                    '"fine_tuning.job.event", "id": "ftevent-12", "type": "metrics", ...}\n\n'
                }
            },
        }
    },
)
def stream_fine_tuning_events(
    job_id: JobId,
    request: Request,
    session: SessionDep,
    factory: SessionFactoryDep,
    tenant: CurrentTenant,
    principal: PrincipalDep,
    after: Annotated[
        str | None, Query(max_length=128, description="Resume after this event id.")
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(
            max_length=128,
            description="Sent by a reconnecting client: resume after this event id.",
        ),
    ] = None,
) -> StreamingResponse:
    """A job's events as server-sent events, as they are written: `job` (the job object,
    again on every change), `event` (each event, oldest first) and, once the job is finished,
    `done`; `error` (revoked_api_key) ends it if its key is revoked meanwhile. Reconnect with
    `Last-Event-ID` (or `after`) to get only what was missed."""
    owned = session.scalar(select(Job.id).where(Job.id == job_id, Job.tenant_id == tenant.id))
    # The request's session would otherwise stay open (and hold a connection) as long as
    # the stream; each poll opens its own.
    session.close()
    if owned is None:
        raise not_found("job", job_id)
    cursor, param = (after, "after") if after else (last_event_id, "Last-Event-ID")
    after_id = 0
    if cursor:
        parsed = parse_event_id(cursor)
        if parsed is None:
            raise invalid(f"Unknown cursor '{cursor}'.", param, "invalid_cursor")
        after_id = parsed
    return StreamingResponse(
        _stream(request, factory, job_id, after_id, principal.key_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
