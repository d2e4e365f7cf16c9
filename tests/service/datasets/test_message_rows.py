"""OpenAI chat and DPO rows: each rejection names its line (or record) and the message's field;
valid rows are stored and read back as core's decoder trainer reads them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.training.decoder_data import ChatExample, DpoExample, coerce_decoder_examples
from service.datasets import codec
from service.datasets.infer import infer_kind
from service.datasets.reading import DatasetFormat
from service.datasets.rows import DatasetError, DatasetKind, Limits
from service.datasets.validation import check_file, parse_file, parse_json_body

CHAT = DatasetKind.CHAT
DPO = DatasetKind.DPO
JSONL = DatasetFormat.JSONL


def user(text: str = "What is 2+2?") -> dict[str, Any]:
    return {"role": "user", "content": text}


def bot(text: str = "4.", **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text, **extra}


def chat_row(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"messages": list(messages) or [user(), bot()]}


def dpo_row(chosen: str = "4.", rejected: str = "5.", **extra: Any) -> dict[str, Any]:
    return {
        "input": {"messages": [{"role": "system", "content": "Be brief."}, user()]},
        "preferred_output": [bot(chosen)],
        "non_preferred_output": [bot(rejected)],
        **extra,
    }


def jsonl(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def fails(rows: list[Any], kind: DatasetKind = CHAT, **limits: int) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        parse_file(jsonl(rows), kind, JSONL, Limits(**limits))
    return info.value


def test_chat_rows_round_trip_through_the_store_into_core() -> None:
    rows = [
        chat_row(
            {"role": "system", "content": "Be brief.", "name": "dropped"},
            user(),
            bot("4.", weight=0),
            user("And 3+3?"),
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "6"}, {"type": "text", "text": "."}],
            },
        ),
        {**chat_row(), "tools": [], "id": 7},  # unknown keys are dropped
        chat_row(bot(weight=0), user(), bot()),  # an assistant first, not learnt: its prompt
    ]
    parsed = parse_file(jsonl(rows), CHAT, JSONL)
    assert parsed.kind is CHAT and parsed.row_count == 3
    assert parsed.label_counts is None and parsed.pair_report is None
    first = parsed.rows[0]["messages"]
    assert first[0] == {"role": "system", "content": "Be brief."}
    assert first[2] == {"role": "assistant", "content": "4.", "weight": 0}
    assert first[4] == {"role": "assistant", "content": "6."}  # text parts joined
    assert parsed.rows[1] == chat_row()
    stored = codec.decode_rows(codec.encode_rows(parsed.rows))
    assert stored == parsed.rows
    examples = coerce_decoder_examples(stored, "chat")
    assert all(isinstance(e, ChatExample) for e in examples) and examples[0].messages == first


def test_dpo_rows_round_trip_through_the_store_into_core() -> None:
    parsed = parse_file(jsonl([dpo_row(), dpo_row("Four.", "Five.", id=1)]), DPO, JSONL)
    assert parsed.rows[0] == dpo_row()
    stored = codec.decode_rows(codec.encode_rows(parsed.rows))
    (example, _) = coerce_decoder_examples(stored, "dpo")
    assert isinstance(example, DpoExample)
    assert (example.chosen["content"], example.rejected["content"]) == ("4.", "5.")
    assert [m["role"] for m in example.prompt] == ["system", "user"]


@pytest.mark.parametrize(
    ("row", "param", "code"),
    [
        ({"messages": "hi"}, "messages", "invalid_type"),
        ({"messages": []}, "messages", "empty_field"),
        ({"prompt": "hi"}, "messages", "missing_field"),
        (
            chat_row(user(), {"role": "tool", "content": "42"}, bot()),
            "messages.1.role",
            "invalid_role",
        ),
        (chat_row({"role": "bot", "content": "x"}, bot()), "messages.0.role", "invalid_role"),
        (chat_row(user(), {"role": "assistant"}), "messages.1.content", "missing_field"),
        (chat_row(user(), bot(7)), "messages.1.content", "invalid_type"),
        (chat_row(user(), bot("  ")), "messages.1.content", "empty_field"),
        (
            chat_row(user(), bot([{"type": "image_url", "image_url": {"url": "x"}}])),
            "messages.1.content.0",
            "unsupported_content",
        ),
        (
            chat_row(user(), bot(None, tool_calls=[{"id": "c"}])),
            "messages.1.tool_calls",
            "unsupported_content",
        ),
        (chat_row(user(), bot(weight=0.5)), "messages.1.weight", "invalid_weight"),
        (chat_row(user(), bot(weight=True)), "messages.1.weight", "invalid_weight"),
        (chat_row({**user(), "weight": 1}, bot()), "messages.0.weight", "invalid_weight"),
        (chat_row(user(), bot(weight=0)), "messages", "no_assistant_message"),
        (chat_row(user()), "messages", "no_assistant_message"),
        # Its prompt would be no message at all: the job failed with IndexError.
        (chat_row(bot()), "messages.0", "assistant_first"),
        (chat_row(bot(), user(), bot()), "messages.0", "assistant_first"),
        (chat_row(user("\ud800"), bot()), "messages.0.content", "invalid_unicode"),
    ],
)
def test_chat_row_errors_name_the_line_and_field(row: Any, param: str, code: str) -> None:
    err = fails([chat_row(), row])
    assert err.message.startswith("line 2:")
    assert (err.param, err.code, err.line) == (param, code, 2)


@pytest.mark.parametrize(
    ("row", "param", "code"),
    [
        (
            {"preferred_output": [bot()], "non_preferred_output": [bot("5")]},
            "input",
            "missing_field",
        ),
        ({**dpo_row(), "input": []}, "input", "invalid_type"),
        ({**dpo_row(), "input": {"messages": []}}, "input.messages", "empty_field"),
        ({**dpo_row(), "preferred_output": [bot(), bot()]}, "preferred_output", "invalid_output"),
        ({**dpo_row(), "preferred_output": [user()]}, "preferred_output", "invalid_output"),
        ({**dpo_row(), "non_preferred_output": None}, "non_preferred_output", "missing_field"),
        (
            {**dpo_row(), "preferred_output": [bot(weight=1)]},
            "preferred_output.0.weight",
            "invalid_weight",
        ),
        (dpo_row("Same.", "Same."), "non_preferred_output", "identical_pair"),
    ],
)
def test_dpo_row_errors_name_the_line_and_field(row: Any, param: str, code: str) -> None:
    err = fails([dpo_row(), row], DPO)
    assert err.message.startswith("line 2:")
    assert (err.param, err.code) == (param, code)


def test_bounds_on_messages_and_characters() -> None:
    many = chat_row(*([user(), bot()] * 3))
    err = fails([many], max_messages=5)
    assert (err.param, err.code) == ("messages", "too_many_messages")
    err = fails([chat_row(user("x" * 11), bot())], max_text_chars=10)
    assert (err.param, err.code) == ("messages.0.content", "field_too_long")
    # Each content fits, but the row's contents together pass three texts' budget.
    err = fails([chat_row(*([user("x" * 10), bot("y" * 10)] * 2))], max_text_chars=10)
    assert (err.param, err.code) == ("messages.3.content", "row_too_long")


def test_json_body_records_name_the_record_and_field() -> None:
    body = json.dumps({"kind": "chat", "records": [chat_row(), chat_row(user(), bot(weight=2))]})
    with pytest.raises(DatasetError) as info:
        parse_json_body([body.encode()])
    assert info.value.param == "records.1.messages.1.weight"
    assert info.value.message.startswith("records[1]:")
    parsed, _ = parse_json_body([json.dumps({"kind": "dpo", "records": [dpo_row()]}).encode()])
    assert parsed.rows == [dpo_row()]


def test_kind_is_inferred_from_the_first_row_and_csv_is_refused() -> None:
    assert infer_kind(jsonl([chat_row()]), JSONL) is CHAT
    assert infer_kind(jsonl([dpo_row()]), JSONL) is DPO
    # A DPO row missing its input is still one: the parse names the missing field.
    assert infer_kind(jsonl([{"preferred_output": []}]), JSONL) is DPO
    # A valid first row may pass a megabyte of JSON ("\u00e9" is 6 bytes): it is read whole.
    long = jsonl([chat_row(user("é" * 100_000), user("é" * 100_000), bot("é" * 100_000))])
    assert len(long) > 1024 * 1024
    assert infer_kind(b"\n" + long, JSONL) is CHAT
    assert parse_file(long, CHAT, JSONL).row_count == 1
    with pytest.raises(DatasetError) as info:
        parse_file(b"messages\nhi\n", CHAT, DatasetFormat.CSV)
    assert (info.value.param, info.value.code) == ("format", "unsupported_format")


def test_dry_run_lists_every_bad_line() -> None:
    data = jsonl([chat_row(), chat_row(user()), chat_row(), chat_row(bot(), {"role": "x"})])
    report = check_file(data, CHAT, JSONL)
    assert report.row_count == 2
    assert [(p.line, p.param) for p in report.problems] == [(2, "messages"), (4, "messages.1.role")]
