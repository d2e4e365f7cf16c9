"""Behaviour of bench.module_sizes on a small made-up checkout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.module_sizes import main, measure


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture()
def checkout(tmp_path: Path) -> Path:
    write(tmp_path, "core/__init__.py", "")
    write(tmp_path, "core/big.py", "import torch\nfrom . import small\n" + "x = 1\n" * 10)
    write(tmp_path, "core/small.py", "import json\nimport safetensors.torch\n")
    write(tmp_path, "service/__init__.py", "")
    write(
        tmp_path,
        "service/app.py",
        "from typing import TYPE_CHECKING\n"
        "import fastapi\n"
        "from service import db\n"
        "if TYPE_CHECKING:\n"
        "    from core.big import x\n"
        "def load():\n"
        "    from core import small\n"
        "    import torch\n",
    )
    write(tmp_path, "service/db.py", "from .app import load\n")
    write(tmp_path, "service/dashboard/app.js", "let a;\n" * 15)
    write(tmp_path, "service/dashboard/other.txt", "not a module\n" * 50)
    write(tmp_path, "elsewhere/ignored.py", "import torch\n" * 50)
    return tmp_path


def test_large_modules_and_totals(checkout: Path) -> None:
    fig = measure(checkout, threshold=10, depth=1)
    assert fig.large == [("service/dashboard/app.js", 15), ("core/big.py", 12)]
    assert fig.modules == 7  # five .py files, two __init__.py, the dashboard's .js; no .txt
    assert fig.lines == 12 + 2 + 8 + 1 + 15


def test_import_graph_counts_deferred_imports_and_skips_type_checking(checkout: Path) -> None:
    fig = measure(checkout, threshold=400, depth=1)
    # service -> core: only the import inside load(); the TYPE_CHECKING one never runs.
    assert {k: (e.module_level, e.deferred) for k, e in fig.edges.items()} == {
        ("service", "core"): (0, 1)
    }
    deep = measure(checkout, threshold=400, depth=2)
    edges = {k: (e.module_level, e.deferred) for k, e in deep.edges.items()}
    assert edges[("core.big", "core.small")] == (1, 0)  # "from . import small" resolved
    assert edges[("service.db", "service.app")] == (1, 0)  # relative import in a module
    assert edges[("service.app", "service.db")] == (1, 0)  # "from service import db"


def test_third_party_imports_by_package(checkout: Path) -> None:
    fig = measure(checkout, threshold=400, depth=1)
    third = {
        pkg: {name: (e.module_level, e.deferred) for name, e in names.items()}
        for pkg, names in fig.third_party.items()
    }
    assert third == {
        "core": {"safetensors": (1, 0), "torch": (1, 0)},  # json is the standard library
        "service": {"fastapi": (1, 0), "torch": (0, 1)},
    }


def test_command_line_writes_json(
    checkout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figures.json"
    assert main(["--root", str(checkout), "--threshold", "10", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 over 10 lines" in printed and "service                  -> core" in printed
    data = json.loads(out.read_text())
    assert data["large"][0] == {"path": "service/dashboard/app.js", "lines": 15}
    assert data["edges"] == [{"from": "service", "to": "core", "module_level": 0, "deferred": 1}]
