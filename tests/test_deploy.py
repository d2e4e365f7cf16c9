"""The compose files parse, wire every process to one database, and can run each service alone.

Checked without a Docker engine: ``docker-compose config`` resolves the files as compose does
(skipped where it is not installed); nginx (likewise) checks the proxy config and runs it
against a stand-in for Docker's DNS, to show that it follows replicas to new addresses.
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests import dockerfile
from tests.ci import unavailable
from tests.e2e.server import free_port

REPO = Path(__file__).resolve().parents[1]
COMPOSE = shutil.which("docker-compose")
NGINX = shutil.which("nginx")
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.postgres.yml"]
IMAGE = "loraplex:latest"
WORKER_CHECK = ["CMD", "loraplex", "worker", "--check"]


def _require(path: str | None, tool: str) -> str:
    """The tool's path; a missing tool skips the test, except in CI (``make test`` installs it)."""
    if path is None:
        unavailable(f"{tool} is not installed (make deploy-deps installs it)")
    return path


def _config(name: str) -> dict[str, Any]:
    """``docker-compose -f name config``: the file as compose itself resolves it."""
    compose = _require(COMPOSE, "docker-compose")
    out = subprocess.run(
        [compose, "-f", name, "config"],
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


def _nginx_main(tmp_path: Path, server_conf: Path) -> Path:
    """A main nginx.conf around ``server_conf``, included where the compose file mounts it
    (conf.d/default.conf, inside the http block)."""
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path / 'nginx.pid'};\nerror_log stderr;\nevents {{}}\n"
        f"http {{\n    access_log off;\n    include {server_conf};\n}}\n"
    )
    return main


def test_proxy_config_is_valid_nginx(tmp_path: Path) -> None:
    nginx = _require(NGINX, "nginx")
    main = _nginx_main(tmp_path, REPO / "deploy" / "nginx.conf")
    out = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(main)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


class _FakeDockerDns:
    """Docker's embedded DNS as nginx sees it: A records per name, changed while it runs."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _answer(self, query: bytes) -> bytes:
        (qid,) = struct.unpack("!H", query[:2])
        labels, i = [], 12
        while query[i]:
            labels.append(query[i + 1 : i + 1 + query[i]].decode())
            i += 1 + query[i]
        question = query[12 : i + 5]  # the name, its zero byte, type and class
        addresses = self.records.get(".".join(labels), [])
        flags = 0x8180 if addresses else 0x8183  # a response; NXDOMAIN for unknown names
        header = struct.pack("!HHHHHH", qid, flags, 1, len(addresses), 0, 0)
        # Each answer: a pointer to the question's name, type A, class IN, TTL 0, 4 bytes.
        answers = b"".join(
            struct.pack("!HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(a) for a in addresses
        )
        return header + question + answers

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, client = self._sock.recvfrom(512)
            except TimeoutError:
                continue
            self._sock.sendto(self._answer(query), client)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


class _Replica(BaseHTTPRequestHandler):
    """Answers every GET with the address it listens on: which replica got the request."""

    def do_GET(self) -> None:
        body = self.server.server_address[0].encode()  # type: ignore[index]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


def _replace_once(text: str, pattern: str, replacement: str) -> str:
    new, count = re.subn(pattern, replacement, text, flags=re.M)
    assert count == 1, pattern  # the config changed shape: this test must change with it
    return new


def test_proxy_follows_replicas_to_new_addresses(tmp_path: Path) -> None:
    """Real nginx on the shipped config; only addresses, ports and the 10 s cache are local."""
    nginx = _require(NGINX, "nginx")
    # Two replicas on one port, at two loopback addresses (two containers' addresses).
    replicas = [ThreadingHTTPServer(("127.0.0.2", 0), _Replica)]
    port = replicas[0].server_address[1]
    replicas.append(ThreadingHTTPServer(("127.0.0.3", port), _Replica))
    for replica in replicas:
        threading.Thread(target=replica.serve_forever, daemon=True).start()
    dns = _FakeDockerDns()
    proxy_port = free_port()
    conf = (REPO / "deploy" / "nginx.conf").read_text()
    conf = _replace_once(
        conf, r"^resolver 127\.0\.0\.11 valid=\d+s", f"resolver 127.0.0.1:{dns.port} valid=1s"
    )
    conf = _replace_once(conf, r"^(\s*)listen 8000;", rf"\1listen 127.0.0.1:{proxy_port};")
    conf = _replace_once(conf, r"http://api:8000;", f"http://api:{port};")
    (tmp_path / "default.conf").write_text(conf)
    main = _nginx_main(tmp_path, tmp_path / "default.conf")
    log = (tmp_path / "nginx.log").open("wb")
    nginx = subprocess.Popen(
        [nginx, "-p", str(tmp_path), "-c", str(main), "-g", "daemon off; master_process off;"],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )

    def replicas_reached(addresses: list[str]) -> set[str]:
        """Point the alias at ``addresses``; which replicas requests reach once nginx follows."""
        dns.records["api"] = addresses
        deadline = time.monotonic() + 30
        seen: set[str] = set()
        while time.monotonic() < deadline and seen != set(addresses):
            try:
                reply = httpx.get(f"http://127.0.0.1:{proxy_port}/v1/models", timeout=5)
            except httpx.TransportError:  # nginx still starting
                time.sleep(0.1)
                continue
            seen = seen | {reply.text} if reply.text in addresses else set()
        return seen

    try:
        for addresses in (
            ["127.0.0.2"],
            # The replica restarted in a new container, at a new address: no reload needed.
            ["127.0.0.3"],
            # Both up: requests spread over both.
            ["127.0.0.2", "127.0.0.3"],
        ):
            reached = replicas_reached(addresses)
            assert reached == set(addresses), (tmp_path / "nginx.log").read_text()[-2000:]
    finally:
        nginx.terminate()
        nginx.wait(30)
        log.close()
        dns.close()
        for replica in replicas:
            replica.shutdown()
            replica.server_close()
