"""Anthropic HH-RLHF pairs to OpenAI fine-tuning rows: chat rows (SFT) and DPO rows.

An HH row is ``{"chosen": DIALOGUE, "rejected": DIALOGUE}``, each dialogue written as
``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..."``; the two share
their turns up to the final assistant reply, which is what the annotator compared.

* The split: the dialogues' turns are read (``Human`` → ``user``, ``Assistant`` →
  ``assistant``, contents stripped) and compared turn by turn; the first turn where they differ
  must be an assistant turn, and everything from its content to the end of each dialogue is
  that side's reply. The turns before it are the shared prompt. (In 5 of the 2,312 harmless-base
  test rows the reply itself goes on with a ``Human:`` line the model wrote; it stays inside the
  reply, as the annotator saw it.)
* Chat row (the SFT target is ``chosen``): the prompt's messages, then the chosen reply. The
  prompt's earlier assistant turns get ``weight: 0``: they were not what the annotator judged
  (the preference is about the final reply only), many are the same red-teamed model's answers
  to harmful requests, and trained or not they would make SFT learn text no label vouches for.
  It also makes the SFT target exactly DPO's preferred output, so the two arms train and are
  scored on the same tokens.
* DPO row: ``input.messages`` is the prompt (no weights: OpenAI's DPO input has none),
  ``preferred_output`` / ``non_preferred_output`` the two replies.

A malformed line (not JSON, not an object, ``chosen``/``rejected`` missing or not strings, no
``\\n\\nHuman:`` at the start, no user turn before the reply, dialogues that differ at a human
turn) raises :class:`HHFormatError` naming its 1-based line; ``--skip-malformed`` prints each
such line on stderr and goes on.

    python -m bench.hh_convert ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz \\
        --chat hh_chat.jsonl --dpo hh_dpo.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

TURN = re.compile(r"\n\n(Human|Assistant):")
ROLE = {"Human": "user", "Assistant": "assistant"}
Message = dict[str, Any]


class HHFormatError(ValueError):
    """A row that is not an HH pair; ``line`` is 1-based (0 when the row came without one)."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line


def _turns(text: str, side: str) -> tuple[list[tuple[str, str]], list[int]]:
    """``[(role, stripped content)]`` of a dialogue, and where each content starts in ``text``."""
    if not text.startswith("\n\nHuman:"):
        raise HHFormatError(f"{side} does not start with '\\n\\nHuman:'")
    marks = list(TURN.finditer(text))
    turns, starts = [], []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        turns.append((ROLE[m.group(1)], text[m.end() : end].strip()))
        starts.append(m.end())
    return turns, starts


def split_pair(row: Any) -> tuple[list[Message], str, str]:
    """``(prompt messages, chosen reply, rejected reply)`` of one HH row."""
    if not isinstance(row, Mapping):
        raise HHFormatError("expected an object with 'chosen' and 'rejected'")
    for side in ("chosen", "rejected"):
        if not isinstance(row.get(side), str):
            raise HHFormatError(f"'{side}' must be a string")
    chosen, rejected = row["chosen"], row["rejected"]
    c_turns, c_starts = _turns(chosen, "chosen")
    r_turns, r_starts = _turns(rejected, "rejected")
    shared = min(len(c_turns), len(r_turns))
    # The first turn that differs; identical dialogues differ nowhere, and their last turn is
    # the (equal) reply.
    k = next((i for i in range(shared) if c_turns[i] != r_turns[i]), shared - 1)
    if c_turns[k][0] != "assistant" or r_turns[k][0] != "assistant":
        raise HHFormatError(f"chosen and rejected differ at turn {k + 1}, which is not a reply")
    prompt = [{"role": role, "content": content} for role, content in c_turns[:k]]
    if not any(m["role"] == "user" for m in prompt):
        raise HHFormatError("no human turn before the reply")
    return prompt, chosen[c_starts[k] :].strip(), rejected[r_starts[k] :].strip()


def to_chat(row: Any) -> dict[str, Any]:
    """The chat (SFT) row: the prompt, earlier replies at ``weight: 0``, the chosen reply."""
    prompt, chosen, _ = split_pair(row)
    context = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in prompt]
    return {"messages": [*context, {"role": "assistant", "content": chosen}]}


def to_dpo(row: Any) -> dict[str, Any]:
    """The DPO row: the shared prompt as input, the two final replies as outputs."""
    prompt, chosen, rejected = split_pair(row)
    return {
        "input": {"messages": prompt},
        "preferred_output": [{"role": "assistant", "content": chosen}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def read_lines(lines: Iterable[str], skip_malformed: bool = False) -> Iterator[tuple[int, Any]]:
    """``(line number, split pair)`` of every non-blank line of an HH JSONL stream."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise HHFormatError(f"not JSON ({e.msg} at column {e.colno})") from None
            split_pair(row)
        except HHFormatError as e:
            if not skip_malformed:
                raise HHFormatError(str(e), n) from None
            print(f"[hh_convert] skipped line {n}: {e}", file=sys.stderr)
            continue
        yield n, row


def _open(path: Path) -> TextIO:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("input", type=Path, help="HH-RLHF JSONL file (.gz or plain)")
    p.add_argument("--chat", type=Path, help="write OpenAI chat rows (SFT on chosen) here")
    p.add_argument("--dpo", type=Path, help="write OpenAI DPO rows here")
    p.add_argument(
        "--skip-malformed", action="store_true", help="skip bad lines (each named on stderr)"
    )
    args = p.parse_args(argv)
    if not args.chat and not args.dpo:
        p.error("give --chat and/or --dpo")
    try:
        with _open(args.input) as f:
            rows = [row for _, row in read_lines(f, args.skip_malformed)]
    except HHFormatError as e:
        raise SystemExit(f"[hh_convert] {args.input}: {e}") from None
    for out, convert in ((args.chat, to_chat), (args.dpo, to_dpo)):
        if out:
            out.write_text("".join(json.dumps(convert(r)) + "\n" for r in rows))
            print(f"[hh_convert] {len(rows)} rows -> {out}")


if __name__ == "__main__":
    main()
