"""The compose files parse, and the scale-out one wires every process to one PostgreSQL."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = shutil.which("docker-compose")


def _config(name: str) -> dict[str, Any]:
    """``docker-compose -f name config``: the file as compose itself resolves it."""
    if COMPOSE is None:
        pytest.skip("docker-compose is not installed")
    out = subprocess.run(
        [COMPOSE, "-f", name, "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    config: dict[str, Any] = yaml.safe_load(out.stdout)
    return config


def test_single_box_compose_parses() -> None:
    services = _config("docker-compose.yml")["services"]
    assert {"api", "worker"} <= set(services)


def test_scale_out_compose_runs_two_apis_and_two_workers_on_postgres() -> None:
    services = _config("docker-compose.postgres.yml")["services"]
    assert set(services) == {"postgres", "api-1", "api-2", "worker-1", "worker-2", "proxy"}
    assert "healthcheck" in services["postgres"]
    assert any("/var/lib/postgresql/data" in v for v in services["postgres"]["volumes"])
    urls = set()
    for name in ("api-1", "api-2", "worker-1", "worker-2"):
        service = services[name]
        env = service["environment"]
        urls.add(env["LORAPLEX_DATABASE_URL"])
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        expected = ["loraplex", "serve"] if name.startswith("api") else ["loraplex", "worker"]
        assert service["command"][:2] == expected
        if name.startswith("api"):
            assert env["LORAPLEX_EMBEDDED_WORKER"] == "false"
    (url,) = urls  # one database for every process
    assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url
    assert services["proxy"]["ports"]


def test_proxy_config_lists_both_api_replicas() -> None:
    conf = (REPO / "deploy" / "nginx.conf").read_text()
    upstream = re.search(r"upstream loraplex_api \{(.*?)\}", conf, re.S)
    assert upstream is not None
    assert re.findall(r"server (api-\d):8000", upstream.group(1)) == ["api-1", "api-2"]
    assert "proxy_buffering off" in conf  # event streams
