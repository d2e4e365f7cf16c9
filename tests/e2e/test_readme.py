"""The README's walkthrough, pasted as written, against a real server.

The three code blocks under "Walkthrough (curl)" (curl, httpx, openai SDK) run unchanged except
for the server's address (the one edit the README allows), from a folder laid out like the
repository root after ``make serve``: ``data/`` is the server's data dir, ``tests/`` the
repository's.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.server import REPO, ServerProcess

pytestmark = pytest.mark.real_model

README_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 900


def readme_blocks(heading: str, end: str = "\n## ") -> list[tuple[str, str]]:
    """(language, code) of each fenced block of the README from ``heading`` to ``end``."""
    text = (REPO / "README.md").read_text()
    start = text.index(heading)
    section = text[start : text.index(end, start + len(heading))]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL)


def walkthrough_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block in the README's walkthrough section."""
    return readme_blocks("## Walkthrough (curl)")


def laid_out(root: Path, server: ServerProcess) -> Path:
    """``root`` laid out like the repository root after ``make serve``: ``data/`` is the
    server's data dir, ``tests/`` the repository's."""
    (root / "data").symlink_to(server.data_dir)
    (root / "tests").symlink_to(REPO / "tests")
    return root


@pytest.fixture
def readme_root(tmp_path: Path, live_server: ServerProcess) -> Path:
    return laid_out(tmp_path, live_server)


def run_block(language: str, code: str, root: Path, server: ServerProcess) -> str:
    code = code.replace(README_URL, server.base_url)
    shell = ["bash", "-e", "-o", "pipefail", "-c"]
    command = shell if language == "bash" else [sys.executable, "-c"]
    done = subprocess.run(
        [*command, code], cwd=root, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, f"{language} block failed:\n{done.stdout}\n{done.stderr}"
    print(done.stdout)  # what a user pasting the block sees (pytest -s)
    return done.stdout


def test_walkthrough_runs_as_pasted(readme_root: Path, live_server: ServerProcess) -> None:
    blocks = walkthrough_blocks()
    assert [language for language, _ in blocks] == ["bash", "python", "python"]
    curl, httpx_block, sdk = (code for _, code in blocks)

    out = run_block("bash", curl, readme_root, live_server)
    # Both jobs (classifier, reward model) ended well, and the calls after them answered.
    assert len(re.findall(r"^ftjob-\S+ succeeded$", out, flags=re.MULTILINE)) == 2, out
    assert '"predictions":[{"label":"fresh"' in out, out
    assert '"preferred":"a"' in out, out

    out = run_block("python", httpx_block, readme_root, live_server)
    assert "'adapter': 'sentiment2'" in out and "'label': 'fresh'" in out, out

    out = run_block("python", sdk, readme_root, live_server)
    status_line = next(line for line in out.splitlines() if line.startswith("succeeded "))
    adapter = status_line.split()[1]
    assert adapter.startswith("lora-sdk-"), status_line
    # The adapter the job produced is listed among the tenant's models.
    assert f"'{adapter}'" in out.splitlines()[-1], out
