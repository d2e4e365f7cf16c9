"""The dashboard checks a dataset in the browser before uploading it; hold that check
(``service/dashboard/validate.js``, run under node) to the server's own parser.

For every file both must agree on whether it is valid, on the rows and label counts when it
is, and on the line of the first problem when it is not; the page goes on to list every bad
line, where the server stops at the first.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.datasets.validation import DatasetError, DatasetKind, detect_format, parse_file

SCRIPT = Path(__file__).resolve().parents[1] / "dashboard" / "check_datasets.mjs"


def _j(*rows: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


CASES: list[tuple[str, str, str | bytes]] = [
    ("ok.jsonl", "classification", _j({"text": "a", "label": 1}, {"text": "b", "label": "0"})),
    (
        "pair.jsonl",
        "classification",
        _j(
            {"text": "a", "text_pair": "", "label": "x"},
            {"text": "b", "text_pair": "c", "label": "y"},
        ),
    ),
    (
        "blank-lines.jsonl",
        "classification",
        _j({"text": "a", "label": "x"}, "", "  ", {"text": "b", "label": "y"}, "{oops"),
    ),
    (
        "bad-json.jsonl",
        "classification",
        _j({"text": "a", "label": "x"}, {"text": "b", "label": "y"}, '{"text": "c",'),
    ),
    ("array.jsonl", "classification", _j({"text": "a", "label": "x"}, "[1, 2]")),
    ("no-label.jsonl", "classification", _j({"text": "a", "label": "x"}, {"text": "b"})),
    ("empty-text.jsonl", "classification", _j({"text": "  ", "label": "x"})),
    ("bool-label.jsonl", "classification", _j({"text": "a", "label": True})),
    ("float-label.jsonl", "classification", _j({"text": "a", "label": 1.5})),
    ("number-text.jsonl", "classification", _j({"text": 3, "label": "x"})),
    (
        "one-class.jsonl",
        "classification",
        _j({"text": "a", "label": "x"}, {"text": "b", "label": "x"}),
    ),
    ("empty.jsonl", "classification", "\n\n"),
    ("prefs.jsonl", "preference", _j({"prompt": "p", "chosen": "a", "rejected": "b"})),
    (
        "same.jsonl",
        "preference",
        _j({"chosen": "a", "rejected": "b"}, {"chosen": "c", "rejected": "c"}),
    ),
    ("no-rejected.jsonl", "preference", _j({"chosen": "a"})),
    ("ok.csv", "classification", 'text,label\n"a, with comma",x\n"multi\nline ""quoted""",y\n'),
    ("crlf-bom.csv", "classification", "\ufefftext,label\r\nfine,x\r\nbad,y\r\n"),
    ("no-column.csv", "classification", "text,category\na,x\n"),
    ("short-row.csv", "classification", "text,label\na,x\nb\nc,y\n"),
    ("multiline-then-bad.csv", "classification", 'text,label\n"one\ntwo",x\nshort\n'),
    ("prefs.csv", "preference", "prompt,chosen,rejected\np,a,b\np,c,d\n"),
    (
        "bad-utf8.jsonl",
        "classification",
        b'{"text": "a", "label": "x"}\n{"text": "\xff", "label": "y"}\n',
    ),
]


def _server(name: str, kind: str, data: bytes) -> tuple[bool, int | None, Any]:
    try:
        parsed = parse_file(data, DatasetKind(kind), detect_format(name, None, data))
    except DatasetError as exc:
        m = re.match(r"line (\d+):", exc.message)
        return False, int(m.group(1)) if m else None, None
    return True, None, (parsed.row_count, parsed.label_counts)


def _node(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("node is not installed")
        pytest.skip("node is not installed")
    proc = subprocess.run(
        [node, str(SCRIPT)], input=json.dumps(cases), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out: list[dict[str, Any]] = json.loads(proc.stdout)
    return out


def test_browser_check_agrees_with_the_server() -> None:
    payload = []
    for name, kind, text in CASES:
        if isinstance(text, bytes):
            payload.append({"name": name, "kind": kind, "base64": base64.b64encode(text).decode()})
        else:
            payload.append({"name": name, "kind": kind, "text": text})
    results = _node(payload)
    for (name, kind, text), got in zip(CASES, results, strict=True):
        data = text if isinstance(text, bytes) else text.encode()
        ok, line, summary = _server(name, kind, data)
        assert (not got["errors"]) == ok, (name, got["errors"])
        if ok:
            rows, label_counts = summary
            assert got["rows"] == rows, name
            assert got["labelCounts"] == label_counts, name
        elif line is not None:
            assert got["errors"][0]["line"] == line, (name, got["errors"])


def test_browser_check_lists_every_bad_line() -> None:
    text = _j(
        {"text": "a", "label": "x"},
        "{bad",
        {"text": "", "label": "y"},
        {"text": "c"},
        {"text": "d", "label": "y"},
    )
    [got] = _node([{"name": "f.jsonl", "kind": None, "text": text}])
    assert [e["line"] for e in got["errors"]] == [2, 3, 4]
    assert got["rows"] == 2 and got["kind"] == "classification"
    [prefs] = _node(
        [{"name": "f.jsonl", "kind": None, "text": _j({"chosen": "a", "rejected": "b"})}]
    )
    assert prefs["kind"] == "preference" and prefs["labelCounts"] is None
