"""`/docs` (Swagger UI) and `/redoc` render in a real headless Chromium with no internet.

Chromium (Debian's package, as for the dashboard test) loads each page from a real uvicorn
server with every host name but the loopback address unresolvable, so a page that needed a
CDN would stay blank; `--dump-dom` prints the page once its scripts have run. Every operation
of the OpenAPI document must be drawn. Skipped without chromium, except in CI.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from service.main import create_app
from tests.ci import unavailable
from tests.e2e.server import free_port
from tests.e2e.test_dashboard import _chromium
from tests.service.conftest import make_settings

RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _chromium()
    if path is None:
        unavailable("chromium is not installed (`apt-get install -y chromium`)")
    return path


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real uvicorn server for the app without its ML hooks (the docs need no model)."""
    settings = make_settings(tmp_path_factory.mktemp("docs"))
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, hooks=[]), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _rendered(chromium: str, url: str, profile: Path) -> str:
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={profile}",
            # Offline: no host name resolves, only the loopback server is reachable.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            # Run the page's scripts (fetching /openapi.json, drawing) before dumping the DOM.
            "--virtual-time-budget=30000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _operation_count(base_url: str) -> int:
    spec = httpx.get(f"{base_url}/openapi.json").json()
    return sum(len(item) for item in spec["paths"].values())


@pytest.mark.parametrize(
    ("page", "operation_marker"),
    [("/docs", 'class="opblock opblock-'), ("/redoc", 'data-section-id="operation/')],
    ids=["swagger-ui", "redoc"],
)
def test_page_draws_every_operation_offline(
    chromium: str, docs_server: str, tmp_path: Path, page: str, operation_marker: str
) -> None:
    dom = _rendered(chromium, f"{docs_server}{page}", tmp_path)
    assert dom.count(operation_marker) == _operation_count(docs_server), dom[-3000:]
    assert "Check a dataset without storing it" in dom  # an operation's summary
