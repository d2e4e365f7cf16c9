"""loraplex as a user installs it: a wheel, not the source tree (what the Docker image runs).

The wheel is built from the files the Dockerfile's wheel stage copies, installed without
``-e`` into a fresh virtual environment, and run from outside the repository: ``loraplex
migrate``, ``loraplex serve`` until ``/readyz`` answers, its embedded worker until ``loraplex
worker --check`` passes. Any file the code reads relative to the source tree (as the
migrations once were) fails here.

Dependencies (torch and the rest) are not installed again: a ``.pth`` file in the new
environment appends the development environment's site-packages to ``sys.path``. ``.pth``
files *inside* an appended directory are not processed, so the editable install's finder,
which maps ``service`` and friends to the source tree, stays inactive; the test checks that
every loraplex package is imported from the new environment.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx

from service.db.migrate import head_revision
from tests import dockerfile
from tests.e2e.server import REPO, base_env, free_port, wait_ready

PACKAGES = ("core", "service", "migrations")
# Run by the installed interpreter: where each package and the migrations come from.
WHERE_FROM = """
import importlib, json, sys
from service.db.migrate import migrations_dir
files = {name: importlib.import_module(name).__file__ for name in sys.argv[1:]}
print(json.dumps({"files": files, "migrations_dir": str(migrations_dir()), "path": sys.path}))
"""
CHECK_TIMEOUT_S = 180.0  # the embedded worker loads the base model before its first heartbeat


def _run(args: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, f"{args}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_an_installed_wheel_migrates_and_serves(tmp_path: Path) -> None:
    # 1. Build the wheel from exactly what the image build copies.
    wheel_stage = dockerfile.stages()[0]
    src = tmp_path / "src"
    src.mkdir()
    for name in dockerfile.copied_sources(wheel_stage):
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, src / name)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, src], cwd=tmp_path)
    (wheel,) = wheels.glob("loraplex-*.whl")

    # 2. A fresh environment: the wheel, plus the dev environment's dependencies via a .pth.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=tmp_path,
        ).strip()
    )
    (site / "loraplex-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=tmp_path)

    # 3. Outside the repository, nothing points back at the sources.
    run_dir = tmp_path / "run"
    data = run_dir / "data"
    data.mkdir(parents=True)
    env = base_env(data)
    env.pop("PYTHONPATH", None)
    where = json.loads(_run([python, "-c", WHERE_FROM, *PACKAGES], cwd=run_dir, env=env))
    for name, file in where["files"].items():
        assert Path(file).is_relative_to(site), (name, file)
    assert Path(where["migrations_dir"]) == site / "migrations"
    assert str(REPO) not in where["path"]

    # 4. The console scripts of the installed distribution.
    loraplex = venv / "bin" / "loraplex"
    migrated = _run([loraplex, "migrate"], cwd=run_dir, env=env)
    assert migrated.strip() == f"database at revision {head_revision()}"

    port = free_port()
    log = (run_dir / "serve.log").open("wb")
    server = subprocess.Popen(
        [loraplex, "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=run_dir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url, server)
        # Package data: the dashboard's files come from site-packages too.
        dashboard = httpx.get(f"{base_url}/dashboard/", timeout=10)
        assert dashboard.status_code == 200 and "<html" in dashboard.text.lower()
        # The embedded worker runs from the installed environment too (its own interpreter).
        deadline = time.monotonic() + CHECK_TIMEOUT_S
        while True:
            check = subprocess.run(
                [loraplex, "worker", "--check"],
                cwd=run_dir,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if check.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert check.returncode == 0, (check.stderr, (run_dir / "serve.log").read_text()[-3000:])
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        log.close()
    # uvicorn re-raises the signal once it has shut down gracefully.
    assert server.returncode in (0, -signal.SIGTERM), (run_dir / "serve.log").read_text()[-3000:]
