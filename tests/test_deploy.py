"""The compose files parse, wire every process to one database, and can run each service alone.

Checked without a Docker engine: ``docker-compose config`` resolves the files as compose does
(skipped where it is not installed), ``nginx -t`` checks the proxy config (likewise).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import dockerfile

REPO = Path(__file__).resolve().parents[1]
COMPOSE = shutil.which("docker-compose")
NGINX = shutil.which("nginx")
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.postgres.yml"]
IMAGE = "loraplex:latest"
WORKER_CHECK = ["CMD", "loraplex", "worker", "--check"]


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


def _role(service: dict[str, Any]) -> str | None:
    """``serve`` or ``worker`` for a loraplex service, else None."""
    command = service.get("command") or []
    return command[1] if command[:1] == ["loraplex"] else None


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_every_service_on_the_image_can_build_it(name: str) -> None:
    services = _config(name)["services"]
    users = {n: s for n, s in services.items() if s.get("image") == IMAGE}
    assert {n for n, s in services.items() if _role(s)} == set(users)
    for service_name, service in users.items():
        # So `docker compose up <any one service>` works on a host that never built it.
        assert Path(service["build"]["context"]) == REPO, service_name
        assert service["build"].get("dockerfile", "Dockerfile") == "Dockerfile", service_name


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_workers_report_health_by_heartbeat_and_apis_over_http(name: str) -> None:
    services = _config(name)["services"]
    roles = {n: _role(s) for n, s in services.items()}
    assert "worker" in roles.values() and "serve" in roles.values()
    for service_name, role in roles.items():
        service = services[service_name]
        if role == "worker":
            # The image's HTTP check would call a worker, which serves no HTTP, unhealthy.
            assert service["healthcheck"]["test"] == WORKER_CHECK, service_name
            assert not service["healthcheck"].get("disable"), service_name
        elif role == "serve":
            # The image's own check, which probes the port the command serves on.
            assert "healthcheck" not in service, service_name
            port = service["command"][service["command"].index("--port") + 1]
            (healthcheck,) = dockerfile.instructions(dockerfile.stages()[-1], "HEALTHCHECK")
            assert f"http://127.0.0.1:{port}/healthz" in healthcheck, service_name


def test_the_image_runs_the_installed_wheel_not_the_sources() -> None:
    """The same install as tests/e2e/test_install.py checks, in the image's terms."""
    wheel_stage, runtime = dockerfile.stages()
    assert wheel_stage[0].upper().endswith(" AS WHEEL")
    assert any(run.startswith("pip wheel ") for run in dockerfile.instructions(wheel_stage, "RUN"))
    # The runtime stage takes nothing from the build context, only the built wheel...
    assert dockerfile.instructions(runtime, "COPY") == ["--from=wheel /wheels /wheels"]
    assert any("/wheels/loraplex-*.whl" in run for run in dockerfile.instructions(runtime, "RUN"))
    # ...and runs where no sources are, so nothing is imported from the working directory.
    assert dockerfile.instructions(runtime, "WORKDIR")[-1] == "/home/loraplex"
    # .dockerignore lets exactly what the wheel stage copies into the build context.
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert allowed == set(dockerfile.copied_sources(wheel_stage))


def test_proxy_resolves_the_replicas_at_request_time() -> None:
    conf = (REPO / "deploy" / "nginx.conf").read_text()
    # Docker's DNS, answers reused briefly: restarted and added replicas get traffic.
    assert re.search(r"^resolver 127\.0\.0\.11 valid=\d+s\b", conf, re.M)
    # A name in a variable is resolved per request; an `upstream` block only at start-up.
    assert not re.search(r"^\s*upstream\s", conf, re.M)
    target = re.search(r"^\s*set \$(\w+) http://([\w-]+):8000;", conf, re.M)
    assert target is not None
    variable, alias = target.groups()
    assert re.search(rf"^\s*proxy_pass \${variable};", conf, re.M)
    assert "proxy_buffering off" in conf  # event streams

    services = _config("docker-compose.postgres.yml")["services"]
    carriers = {
        n
        for n, s in services.items()
        if alias in ((s.get("networks") or {}).get("default") or {}).get("aliases", [])
    }
    assert carriers == {n for n, s in services.items() if _role(s) == "serve"}
    assert carriers == {"api-1", "api-2"}


def test_proxy_config_is_valid_nginx(tmp_path: Path) -> None:
    if NGINX is None:
        pytest.skip("nginx is not installed")
    # The compose file mounts it into nginx's http block (conf.d/default.conf).
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path / 'nginx.pid'};\nerror_log stderr;\nevents {{}}\n"
        f"http {{\n    access_log off;\n    include {REPO / 'deploy' / 'nginx.conf'};\n}}\n"
    )
    out = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(main)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
