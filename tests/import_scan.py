"""Every import statement in a Python file, read with :mod:`ast` (nothing is imported).

One scanner for the two readers of the import graph, so they agree on what an import is: the
import contracts (``tests/test_architecture.py``, which counts every statement) and the
figures ``python -m bench.module_sizes`` prints (which skips ``TYPE_CHECKING`` blocks and
counts deferred imports apart). It lives with the tests because the contracts are its first
reader and show it finds every form; bench imports test helpers already (``bench.http_load``
runs ``tests.e2e.server``), and tests import no bench helper.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # absolute: relative imports resolved against the file's package
    names: tuple[str, ...]  # what ``from module import ...`` takes; () for ``import module``
    deferred: bool  # inside a function: runs when it is called, not on import
    type_checking: bool  # under ``if TYPE_CHECKING:``: never runs

    @property
    def loads(self) -> set[str]:
        """The modules the statement may load: ``from service import api`` names both
        ``service`` and ``service.api``."""
        return {self.module, *(f"{self.module}.{name}" for name in self.names)}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def scan(path: Path, root: Path, text: str | None = None) -> list[Import]:
    """Each import statement in ``path`` (a file under ``root``), in line order.

    ``text`` is the file's source when the caller has read it already.
    """
    package = module_name(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    if text is None:
        text = path.read_text(encoding="utf-8")

    def visit(node: ast.AST, deferred: bool, type_checking: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(node.lineno, alias.name, (), deferred, type_checking)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - (node.level - 1)]
                module = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names = tuple(alias.name for alias in node.names)
            yield Import(node.lineno, module, names, deferred, type_checking)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            for stmt in node.body:
                yield from visit(stmt, deferred, True)
            for stmt in node.orelse:
                yield from visit(stmt, deferred, type_checking)
        else:
            inner = deferred or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            for child in ast.iter_child_nodes(node):
                yield from visit(child, inner, type_checking)

    tree = ast.parse(text, filename=str(path))
    return sorted(visit(tree, False, False), key=lambda found: found.line)
