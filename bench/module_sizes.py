"""Module sizes and the package import graph of a checkout: the figures for "is the house tidy".

``python -m bench.module_sizes`` prints, for the checkout this file sits in (or ``--root``):

* every source module (``.py``, and the dashboard's ``.js``) longer than ``--threshold`` lines
  (default 400, the size past which a module must say at its top why it holds several ideas);
* the import graph between packages at ``--depth`` (1: ``core``, ``service``, ``bench``...;
  2: ``core.inference``, ``service.api``...), read statically with :mod:`ast`, so nothing is
  imported and any old checkout can be measured (``git archive <rev> | tar -x -C /tmp/x``).
  Each edge says how many imports run at module level and how many are deferred (inside a
  function): deferred ``service → core`` imports are what keeps ``import service.main`` free
  of torch;
* which third-party packages each top-level package imports.

``--json PATH`` writes the same figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.import_scan import module_name, scan

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "service", "bench", "tests", "migrations")
SKIP_DIRS = {"__pycache__", ".venv", "node_modules", ".git"}
# Third-party names worth watching at the layer boundaries; the rest are summed up as "other".
WATCHED = (
    "torch",
    "fastapi",
    "starlette",
    "sqlalchemy",
    "alembic",
    "uvicorn",
    "httpx",
    "pydantic",
    "safetensors",
    "tokenizers",
    "transformers",
)


@dataclass
class Edge:
    module_level: int = 0
    deferred: int = 0


@dataclass
class Figures:
    large: list[tuple[str, int]] = field(default_factory=list)  # (path, lines), longest first
    modules: int = 0
    lines: int = 0
    edges: dict[tuple[str, str], Edge] = field(default_factory=dict)
    third_party: dict[str, dict[str, Edge]] = field(default_factory=dict)  # package → name → n


def source_files(root: Path) -> Iterator[Path]:
    for pkg in PACKAGES:
        base = root / pkg
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if SKIP_DIRS.intersection(path.parts) or not path.is_file():
                continue
            if path.suffix == ".py" or (path.suffix == ".js" and "dashboard" in path.parts):
                yield path


def _group(module: str, depth: int) -> str:
    return ".".join(module.split(".")[:depth])


def measure(root: Path, threshold: int, depth: int) -> Figures:
    fig = Figures()
    edges: dict[tuple[str, str], Edge] = defaultdict(Edge)
    third: dict[str, dict[str, Edge]] = defaultdict(lambda: defaultdict(Edge))
    files = list(source_files(root))
    known = {module_name(p, root) for p in files if p.suffix == ".py"}
    for path in files:
        text = path.read_text(encoding="utf-8")
        n = len(text.splitlines())
        fig.modules += 1
        fig.lines += n
        if n > threshold:
            fig.large.append((str(path.relative_to(root)), n))
        if path.suffix != ".py":
            continue
        module = module_name(path, root)
        src = _group(module, depth)
        # Imports under "if TYPE_CHECKING:" never run. "from core import small" imports the
        # module core.small where one exists.
        targets = [
            (sub, found.deferred)
            for found in scan(path, root, text)
            if not found.type_checking
            for sub in (sorted((found.loads - {found.module}) & known) or [found.module])
        ]
        for target, deferred in targets:
            top = target.split(".")[0]
            if top in PACKAGES:
                dst = _group(target, depth)
                if dst == src:
                    continue
                edge = edges[(src, dst)]
            elif top and top not in sys.stdlib_module_names:
                edge = third[module.split(".")[0]][top if top in WATCHED else "other"]
            else:
                continue
            if deferred:
                edge.deferred += 1
            else:
                edge.module_level += 1
    fig.large.sort(key=lambda item: -item[1])
    fig.edges = dict(sorted(edges.items()))
    fig.third_party = {k: dict(sorted(third[k].items())) for k in sorted(third)}
    return fig


def report(fig: Figures, threshold: int, depth: int) -> str:
    out = [f"{fig.modules} modules, {fig.lines} lines; {len(fig.large)} over {threshold} lines:"]
    out += [f"  {lines:5d}  {path}" for path, lines in fig.large] or ["  (none)"]
    out.append(f"\nimport graph at depth {depth} (module-level + deferred imports):")
    for (src, dst), e in fig.edges.items():
        out.append(f"  {src:24s} -> {dst:24s} {e.module_level:3d} + {e.deferred:3d} deferred")
    out.append("\nthird-party imports per top-level package (module-level + deferred):")
    for pkg, names in fig.third_party.items():
        listed = ", ".join(f"{n} {e.module_level}+{e.deferred}" for n, e in names.items())
        out.append(f"  {pkg:10s} {listed}")
    return "\n".join(out)


def to_json(fig: Figures, threshold: int, depth: int) -> dict[str, object]:
    return {
        "threshold": threshold,
        "depth": depth,
        "modules": fig.modules,
        "lines": fig.lines,
        "large": [{"path": p, "lines": n} for p, n in fig.large],
        "edges": [
            {"from": s, "to": d, "module_level": e.module_level, "deferred": e.deferred}
            for (s, d), e in fig.edges.items()
        ],
        "third_party": {
            pkg: {n: {"module_level": e.module_level, "deferred": e.deferred} for n, e in v.items()}
            for pkg, v in fig.third_party.items()
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout to measure")
    ap.add_argument("--threshold", type=int, default=400, help="list modules over N lines")
    ap.add_argument("--depth", type=int, default=1, help="package depth of the import graph")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.threshold < 0 or args.depth < 1:
        ap.error("--threshold must be >= 0 and --depth >= 1")
    fig = measure(args.root.resolve(), args.threshold, args.depth)
    print(report(fig, args.threshold, args.depth))
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(fig, args.threshold, args.depth), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
