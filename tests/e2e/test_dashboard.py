"""The dashboard in a real browser, against a real ``loraplex serve``.

Runs ``node --test tests/dashboard/dashboard.spec.mjs``: headless Chromium (Debian's
``chromium`` package) driven by ``playwright-core``, which downloads no browser of its own.
``make install`` sets both up. Without node, the npm packages or chromium the test is skipped
with the reason, except in CI (``CI=true``), where it fails instead.

Screenshots of every page land in ``artifacts/dashboard/`` (or ``$DASHBOARD_ARTIFACTS``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.ci import unavailable
from tests.e2e.server import REPO, ServerProcess

pytestmark = pytest.mark.real_model

SPEC_DIR = REPO / "tests" / "dashboard"
SPEC = SPEC_DIR / "dashboard.spec.mjs"
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
RUN_TIMEOUT_S = 900


def _chromium() -> str | None:
    explicit = os.environ.get("CHROMIUM_PATH")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (SPEC_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed (`make install`, or `npm ci` in tests/dashboard)"
    if _chromium() is None:
        return "chromium is not installed (`apt-get install -y chromium`)"
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    """Chromium's path; checked before the server starts (skip or, in CI, fail at once)."""
    reason = _missing()
    if reason:
        unavailable(reason)
    path = _chromium()
    assert path is not None
    return path


def test_dashboard_in_headless_chromium(chromium: str, live_server: ServerProcess) -> None:
    artifacts = Path(os.environ.get("DASHBOARD_ARTIFACTS", REPO / "artifacts" / "dashboard"))
    artifacts.mkdir(parents=True, exist_ok=True)
    for old in artifacts.glob("*.png"):
        old.unlink()
    env = {
        **os.environ,
        "BASE_URL": live_server.base_url,
        "API_KEY": live_server.api_key,
        "ARTIFACTS_DIR": str(artifacts),
        "CHROMIUM_PATH": chromium,
    }
    try:
        proc = subprocess.run(
            ["node", "--test", "--test-reporter=spec", str(SPEC)],
            cwd=SPEC_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"browser test ran past {RUN_TIMEOUT_S} s:\n{exc.stdout}\n{exc.stderr}")
    print(proc.stdout[-20000:], proc.stderr[-5000:])
    assert proc.returncode == 0, (
        f"browser test failed (exit {proc.returncode}):\n{proc.stdout[-15000:]}\n"
        f"{proc.stderr[-5000:]}\n--- server log ---\n{live_server.log_tail(60)}"
    )
    shots = sorted(p.name for p in artifacts.glob("*.png"))
    assert len(shots) >= 12, shots
