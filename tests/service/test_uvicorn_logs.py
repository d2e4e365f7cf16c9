"""What ``loraplex serve``'s uvicorn writes to its logs, on a real server (``uvicorn_config``,
as ``serve`` runs it): no credentials from URLs, and no traceback for a client that left."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import uvicorn

from service.cli import uvicorn_config
from service.main import create_app
from tests.e2e.server import free_port
from tests.service.conftest import make_settings

WAIT_S = 30.0
ADMIN_KEY = "operator's admin/secret"  # no key shape: masked as the configured value


class Server:
    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.port = int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("uvicorn-logs")
    settings = make_settings(data_dir, host="127.0.0.1", port=free_port(), admin_key=ADMIN_KEY)
    uv = uvicorn.Server(uvicorn_config(create_app(settings, hooks=[]), settings))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    key = (Path(data_dir) / "default_api_key").read_text().strip()
    try:
        yield Server(f"http://127.0.0.1:{settings.port}", key)
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


class Lines(logging.Handler):
    """Formatted records of the loggers it is attached to, as the console would show them."""

    def __init__(self, *loggers: str) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[tuple[str, str]] = []
        self.loggers = [logging.getLogger(name) for name in loggers]

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelname, record.getMessage()))

    def __enter__(self) -> Lines:
        self.levels = [logger.level for logger in self.loggers]
        for logger in self.loggers:
            logger.addHandler(self)
            logger.setLevel(logging.INFO)  # as `serve` logs by default
        return self

    def __exit__(self, *exc: object) -> None:
        for logger, level in zip(self.loggers, self.levels, strict=True):
            logger.removeHandler(self)
            logger.setLevel(level)

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not any(text in line for _, line in self.lines):
            assert time.monotonic() < deadline, (text, self.lines)
            time.sleep(0.02)


def test_a_key_in_the_query_is_redacted_from_the_access_log(server: Server) -> None:
    with Lines("uvicorn.access") as log:
        resp = httpx.get(f"{server.url}/v1/models?api_key=lpx_leaked&limit=5&token=tok_leaked")
        assert resp.status_code == 401  # keys go in the Authorization header only
        log.wait_for("/v1/models")
    assert not [line for _, line in log.lines if "leaked" in line], log.lines
    assert any(
        "/v1/models?api_key=[REDACTED]&limit=5&token=[REDACTED]" in line for _, line in log.lines
    )


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models?x-api-key={key}",
        "/v1/models?authorization=Bearer%20{key}",
        "/v1/models?api%5Fkey={key}",
        "/v1/models?limit=5&bearer={key}",
        "/v1/datasets/{key}",  # a key pasted where an id goes
    ],
)
def test_a_key_anywhere_in_the_request_line_is_redacted(server: Server, path: str) -> None:
    with Lines("uvicorn.access") as log:
        resp = httpx.get(server.url + path.format(key=server.key))
        assert resp.status_code == 401  # keys go in the Authorization header only
        log.wait_for("[REDACTED]")
    assert not [line for _, line in log.lines if server.key[4:] in line], log.lines


@pytest.mark.parametrize("path", ["/v1/models?foo={key}", "/v1/datasets/{key}"])
def test_the_admin_key_is_redacted_wherever_it_stands(server: Server, path: str) -> None:
    with Lines("uvicorn.access") as log:
        httpx.get(server.url + path.format(key=quote(ADMIN_KEY, safe="")))
        log.wait_for("[REDACTED]")
    assert not [line for _, line in log.lines if "secret" in line], log.lines


def test_a_client_that_leaves_mid_upload_is_logged_as_a_disconnect(server: Server) -> None:
    head = (
        "POST /v1/files HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {server.key}\r\n"
        "Content-Type: multipart/form-data; boundary=XX\r\nContent-Length: 100000\r\n\r\n"
        '--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
    )
    with Lines("service.api.errors", "uvicorn.error") as log:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(head.encode())  # a tenth of the promised body, then gone
        log.wait_for("client disconnected during POST /v1/files")
    assert [level for level, _ in log.lines] == ["INFO"], log.lines
