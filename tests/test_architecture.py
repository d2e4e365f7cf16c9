"""Import contracts between the layers docs/architecture.md describes, checked on the source.

Every import statement counts, including those deferred into functions and those under
``if TYPE_CHECKING:``: a layer that names another layer's types depends on it as surely as one
that calls it. The scan (:mod:`tests.import_scan`) reads files with :mod:`ast`, so nothing is
imported to check them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.import_scan import Import, scan

ROOT = Path(__file__).resolve().parents[1]

# core takes tensors, configs and bytes: it knows nothing of the service, HTTP or SQL.
CORE_FORBIDDEN = ("service", "fastapi", "starlette", "sqlalchemy", "alembic", "uvicorn", "httpx")
# Domain packages speak in domain errors and values; only service.api (and the app wiring in
# service.main) knows HTTP.
DOMAIN_PACKAGES = ("jobs", "datasets", "adapters", "serving", "worker", "tenants", "db")
DOMAIN_FORBIDDEN = ("service.api", "fastapi", "starlette")


def python_files(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs for p in d.rglob("*.py") if "__pycache__" not in p.parts)


def offenders(files: list[Path], forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """``"path:line: module"`` for each import of a forbidden package (or a module in one)."""
    out = []
    for path in files:
        for found in scan(path, root):
            if any(n == f or n.startswith(f + ".") for n in found.loads for f in forbidden):
                out.append(f"{path.relative_to(root)}:{found.line}: {found.module}")
    return out


def test_the_scan_finds_every_form_of_import(tmp_path: Path) -> None:
    """The contracts pass by finding nothing, so the scan itself must be shown to find."""
    module = tmp_path / "service" / "jobs" / "example.py"
    module.parent.mkdir(parents=True)
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "from fastapi import FastAPI\n"
        "from service import api\n"
        "from .sibling import thing\n"
        "from ..api.deps import X\n"
        "def deferred():\n"
        "    import starlette.responses\n"
        "if TYPE_CHECKING:\n"
        "    from service.api.deps import Y\n"
        "import services_elsewhere\n"
    )
    assert offenders([module], DOMAIN_FORBIDDEN, tmp_path) == [
        "service/jobs/example.py:2: fastapi",
        "service/jobs/example.py:3: service",
        "service/jobs/example.py:5: service.api.deps",
        "service/jobs/example.py:7: starlette.responses",
        "service/jobs/example.py:9: service.api.deps",
    ]
    found = scan(module, tmp_path)
    sibling = Import(4, "service.jobs.sibling", ("thing",), deferred=False, type_checking=False)
    assert sibling in found
    assert sibling.loads == {"service.jobs.sibling", "service.jobs.sibling.thing"}
    # What bench.module_sizes counts apart: the deferred import and the one that never runs.
    flagged = [
        (f.line, f.deferred, f.type_checking) for f in found if f.deferred or f.type_checking
    ]
    assert flagged == [(7, True, False), (9, False, True)]


def test_core_imports_no_service_web_or_sql() -> None:
    files = python_files(ROOT / "core")
    assert len(files) > 20
    found = offenders(files, CORE_FORBIDDEN)
    assert found == [], "core modules importing the service, web or SQL:\n" + "\n".join(found)


def test_domain_packages_import_no_http_layer() -> None:
    dirs = [ROOT / "service" / p for p in DOMAIN_PACKAGES]
    assert all(d.is_dir() for d in dirs)  # a renamed package must not drop out unnoticed
    found = offenders(python_files(*dirs), DOMAIN_FORBIDDEN)
    assert found == [], "domain modules importing the HTTP layer:\n" + "\n".join(found)


def test_importing_the_app_loads_no_torch() -> None:
    """The API process imports torch when its lifespan loads the model, never on import, so
    the CLI, migrations and the worker's parent process stay light."""
    code = "import sys, service.main; print([m for m in sys.modules if m.startswith('torch')])"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
