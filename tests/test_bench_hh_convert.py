"""bench.hh_convert on literal HH-RLHF rows: the split, both row shapes, malformed lines."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from bench import hh_convert as hc
from core.training.decoder_data import coerce_decoder_examples

ONE_TURN = {
    "chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that.",
    "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Use a tension wrench.",
}
TWO_TURNS = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: "
    "Why did the chicken cross the road?",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No.",
}
# As in 5 harmless-base rows: the chosen reply goes on with turns the model wrote itself.
RUNS_ON = {
    "chosen": "\n\nHuman: Are drag queens men?\n\nAssistant: Mostly.\n\nHuman: Then what?"
    "\n\nAssistant: I think",
    "rejected": "\n\nHuman: Are drag queens men?\n\nAssistant: Often, yes.",
}


def test_one_turn_pair() -> None:
    assert hc.to_chat(ONE_TURN) == {
        "messages": [
            {"role": "user", "content": "How do I pick a lock?"},
            {"role": "assistant", "content": "I can't help with that."},
        ]
    }
    assert hc.to_dpo(ONE_TURN) == {
        "input": {"messages": [{"role": "user", "content": "How do I pick a lock?"}]},
        "preferred_output": [{"role": "assistant", "content": "I can't help with that."}],
        "non_preferred_output": [{"role": "assistant", "content": "Use a tension wrench."}],
    }


def test_earlier_replies_are_context_at_weight_0() -> None:
    chat = hc.to_chat(TWO_TURNS)["messages"]
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
    assert chat[1] == {"role": "assistant", "content": "Hello!", "weight": 0}
    assert chat[3] == {"role": "assistant", "content": "Why did the chicken cross the road?"}
    dpo = hc.to_dpo(TWO_TURNS)
    # DPO's input has no weights; the prompt is the shared turns, in order.
    assert dpo["input"]["messages"] == [{k: m[k] for k in ("role", "content")} for m in chat[:3]]
    assert dpo["non_preferred_output"] == [{"role": "assistant", "content": "No."}]
    # Both shapes are what the decoder trainer reads.
    assert len(coerce_decoder_examples([hc.to_chat(TWO_TURNS)], "chat")) == 1
    assert len(coerce_decoder_examples([dpo], "dpo")) == 1


def test_a_reply_that_runs_on_keeps_its_text() -> None:
    prompt, chosen, rejected = hc.split_pair(RUNS_ON)
    assert prompt == [{"role": "user", "content": "Are drag queens men?"}]
    assert chosen == "Mostly.\n\nHuman: Then what?\n\nAssistant: I think"
    assert rejected == "Often, yes."


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (["not", "an", "object"], "expected an object"),
        ({"chosen": ONE_TURN["chosen"]}, "'rejected' must be a string"),
        ({"chosen": "Human: hi\n\nAssistant: a", "rejected": "x"}, "chosen does not start"),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: b"},
            "differ at turn 1, which is not a reply",
        ),
        (
            {"chosen": "\n\nHuman:", "rejected": "\n\nHuman:"},
            "differ at turn 1, which is not a reply",
        ),
    ],
)
def test_malformed_rows_say_why(row: object, message: str) -> None:
    with pytest.raises(hc.HHFormatError, match=message):
        hc.split_pair(row)


def test_lines_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    lines = [json.dumps(ONE_TURN), "", "{not json", json.dumps({"chosen": 1, "rejected": ""})]
    with pytest.raises(hc.HHFormatError, match=r"^line 3: not JSON"):
        list(hc.read_lines(lines))
    assert [n for n, _ in hc.read_lines(lines, skip_malformed=True)] == [1]
    err = capsys.readouterr().err
    assert "skipped line 3: not JSON" in err and "skipped line 4: 'chosen' must be" in err


def test_cli_writes_both_files_and_refuses_a_bad_line(tmp_path: Path) -> None:
    src = tmp_path / "hh.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in (ONE_TURN, TWO_TURNS, RUNS_ON))
    chat, dpo = tmp_path / "chat.jsonl", tmp_path / "dpo.jsonl"
    hc.main([str(src), "--chat", str(chat), "--dpo", str(dpo)])
    chat_rows = [json.loads(x) for x in chat.read_text().splitlines()]
    dpo_rows = [json.loads(x) for x in dpo.read_text().splitlines()]
    assert chat_rows == [hc.to_chat(r) for r in (ONE_TURN, TWO_TURNS, RUNS_ON)]
    assert dpo_rows == [hc.to_dpo(r) for r in (ONE_TURN, TWO_TURNS, RUNS_ON)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ONE_TURN) + "\n" + json.dumps({"chosen": "x", "rejected": "y"}))
    with pytest.raises(SystemExit, match="line 2: chosen does not start"):
        hc.main([str(bad), "--chat", str(chat)])
