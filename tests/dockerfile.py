"""The repository's Dockerfile, read as instructions (no Docker engine needed)."""

from __future__ import annotations

import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"


def stages(path: Path = DOCKERFILE) -> list[list[str]]:
    """Each build stage's instructions (``FROM`` first), continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", path.read_text())
    result: list[list[str]] = []
    for line in (raw.strip() for raw in joined.splitlines()):
        if not line or line.startswith("#"):
            continue
        if keyword(line) == "FROM":
            result.append([])
        result[-1].append(line)
    return result


def keyword(instruction: str) -> str:
    return instruction.split(maxsplit=1)[0].upper()


def instructions(stage: list[str], name: str) -> list[str]:
    """The stage's ``name`` instructions (``COPY``, ``RUN``, ...), keyword removed."""
    return [line.split(maxsplit=1)[1] for line in stage if keyword(line) == name]


def copied_sources(stage: list[str]) -> list[str]:
    """What a stage's ``COPY`` instructions take from the build context."""
    sources: list[str] = []
    for args in instructions(stage, "COPY"):
        *srcs, _dest = args.split()
        sources += [s for s in srcs if not s.startswith("--")]
    return sources
