"""Tenants reach the generation scheduler as its owners, over /v1/chat/completions on the tiny
random Llama: a tenant whose waiting queue is full is refused with 503 while another tenant's
request is still accepted and queued.

The scheduler's owner thread is stopped before the requests are sent, so none is ever admitted:
every accepted request stays queued whatever the machine's speed, and the test calls the app
itself (a streamed response starts before its first token, then waits) without racing it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.main import create_app
from service.serving.lifespan import serving
from service.state import app_state
from tests.core.decoder.tiny_llama import TINY_LLAMA_NAME
from tests.service.helpers import (
    Headers,
    assert_error,
    json_post_scope,
    tenant_id_by_name,
    tiny_bases_settings,
)

pytestmark = pytest.mark.sqlite_only

HANG_GUARD_S = 60.0  # only so that a broken response start fails instead of hanging


@pytest.fixture
def client(settings: Settings, tiny_model_dir: Path, tiny_llama_dir: Path) -> Iterator[TestClient]:
    app_settings = tiny_bases_settings(
        settings, tiny_model_dir, tiny_llama_dir, TINY_LLAMA_NAME, generation_max_waiting=1
    )
    with TestClient(create_app(app_settings, hooks=[serving])) as test_client:
        yield test_client


@dataclass
class Call:
    """One streamed chat completion, the app called as a client that stays connected."""

    task: asyncio.Task[None]
    status: asyncio.Future[int]
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)

    def error(self) -> Any:
        return json.loads(self.body)["error"]


CHAT = {
    "model": TINY_LLAMA_NAME,
    "messages": [{"role": "user", "content": "Hello there."}],
    "max_tokens": 4,
    "stream": True,
}


def chat(
    app: Any,
    auth: Headers,
    path: str = "/v1/chat/completions",
    payload: dict[str, Any] = CHAT,
    query: bytes = b"",
) -> Call:
    body = json.dumps(payload).encode()
    scope = json_post_scope(path, body, auth["Authorization"], query)
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    call: Call

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client never leaves; the task is cancelled
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            call.headers.update(message["headers"])
            call.status.set_result(int(message["status"]))
        elif message["type"] == "http.response.body":
            call.body += message.get("body", b"")

    loop = asyncio.get_running_loop()
    call = Call(loop.create_task(app(scope, receive, send)), loop.create_future())
    return call


def test_a_tenants_full_queue_refuses_it_while_another_tenant_is_queued(
    client: TestClient, new_tenant: Callable[[str], Headers], db: sessionmaker[Session]
) -> None:
    a, b = new_tenant("a"), new_tenant("b")
    generation = app_state(client.app).generation
    assert generation is not None
    server = generation[TINY_LLAMA_NAME]
    server.stop()  # no step runs from here: what is accepted stays queued
    scheduler = server.scheduler

    async def run() -> None:
        first_a = chat(client.app, a)
        assert await asyncio.wait_for(first_a.status, HANG_GUARD_S) == 200
        # A's queue (LORAPLEX_GENERATION_MAX_WAITING=1) is full: A's next request is refused.
        second_a = chat(client.app, a)
        assert await asyncio.wait_for(second_a.status, HANG_GUARD_S) == 503
        await second_a.task
        assert second_a.error()["code"] == "generation_queue_full"
        assert "1 of your generation requests are already waiting" in second_a.error()["message"]
        assert second_a.headers[b"retry-after"] == b"1"
        # So is A's on the other generating routes: each queues under the caller's tenant,
        # /predict on the base's id too (no adapter names the tenant there).
        completion = {"model": TINY_LLAMA_NAME, "prompt": "Hello", "max_tokens": 4}
        predict = {"inputs": ["Hello there."], "max_tokens": 4}
        for path, payload, query in (
            ("/v1/completions", completion, b""),
            ("/predict", predict, f"adapter={TINY_LLAMA_NAME}".encode()),
        ):
            other_a = chat(client.app, a, path, payload, query)
            assert await asyncio.wait_for(other_a.status, HANG_GUARD_S) == 503, path
            await other_a.task
            assert other_a.error()["code"] == "generation_queue_full", path
        # B's queue is its own: B's request is accepted and waits beside A's.
        first_b = chat(client.app, b)
        try:
            assert await asyncio.wait_for(first_b.status, HANG_GUARD_S) == 200
            assert scheduler.waiting == 2
            # Each waits as its tenant's: the tenant id is the scheduler's owner.
            assert set(scheduler._waiting) == {
                tenant_id_by_name(db, "a"),
                tenant_id_by_name(db, "b"),
            }
        finally:
            for call in (first_a, first_b):
                call.task.cancel()
            await asyncio.gather(first_a.task, first_b.task, return_exceptions=True)

    asyncio.run(run())


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/chat/completions", {**CHAT, "stream": False}),
        ("/v1/completions", {"model": TINY_LLAMA_NAME, "prompt": "Hello", "max_tokens": 4}),
    ],
)
def test_the_admin_key_may_not_generate_on_a_base(
    client: TestClient, admin: Headers, path: str, payload: dict[str, Any]
) -> None:
    """The environment admin key manages tenants only: generation on a decoder base is a
    tenant's, as every other tenant route, and nothing is queued under no owner."""
    generation = app_state(client.app).generation
    assert generation is not None
    scheduler = generation[TINY_LLAMA_NAME].scheduler
    assert_error(client.post(path, json=payload, headers=admin), 403, code="tenant_key_required")
    assert (scheduler.waiting, scheduler.generated_tokens) == (0, 0)
