"""End-to-end fixtures: real server processes over real HTTP, real MiniLM weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.server import ServerProcess

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A ``loraplex serve`` (embedded worker, SQLite in a temp data dir) for one test module."""
    server = ServerProcess(
        tmp_path_factory.mktemp("loraplex-data"),
        settings={"checkpoint_every_steps": 5, "heartbeat_seconds": 1, "lease_seconds": 10},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def load_jsonl(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line]
