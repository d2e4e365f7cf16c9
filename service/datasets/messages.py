"""OpenAI's fine-tuning rows for a decoder base: chat rows and DPO rows, checked and normalised.

The shapes are OpenAI's fine-tuning file formats (what ``client.files.create(purpose=
"fine-tune")`` uploads for ``supervised`` and ``dpo`` jobs)::

    chat: {"messages": [{"role": "system" | "user" | "assistant", "content": "...",
                         "weight": 0 | 1 (assistant messages only, optional)}, ...]}
    dpo:  {"input": {"messages": [...]},
           "preferred_output": [{"role": "assistant", "content": "..."}],
           "non_preferred_output": [{"role": "assistant", "content": "..."}]}

A content may also be OpenAI's list of text parts (``[{"type": "text", "text": "..."}]``),
stored joined into one string; other parts (images, audio) and tool calls are refused, as the
decoder base trains on text turns only (the ``tool`` role too: its chat template is not one the
trainer renders). Unknown keys (OpenAI's ``tools``, a message's ``name``) are dropped, as the
text kinds drop unknown columns.

Every problem is a :class:`DatasetError` naming the line (or record) and the field as a dotted
path (``messages.2.role``); normalised rows are exactly what
:func:`core.training.decoder_data.coerce_decoder_examples` reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.datasets.rows import DatasetKind, Limits, Where, check_text, type_name

ROLES = ("system", "user", "assistant")
# A row's contents together: the budget of a preference row's three texts.
ROW_TEXT_FIELDS = 3


class _Budget:
    """Characters of one row's contents still allowed."""

    def __init__(self, limits: Limits) -> None:
        self.left = ROW_TEXT_FIELDS * limits.max_text_chars

    def spend(self, text: str, field: str, where: Where, limits: Limits) -> None:
        self.left -= len(text)
        if self.left < 0:
            raise where.error(
                f"the row's message contents are longer than "
                f"{ROW_TEXT_FIELDS * limits.max_text_chars} characters together",
                field,
                "row_too_long",
            )


def _content(value: Any, field: str, where: Where) -> str:
    """A message's text: a string, or OpenAI's list of text parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts: list[str] = []
        for j, part in enumerate(value):
            at = f"{field}.{j}"
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type_name(part)
                raise where.error(
                    f"field '{at}' is a {kind!r} content part; only text parts "
                    '({"type": "text", "text": "..."}) can be trained',
                    at,
                    "unsupported_content",
                )
            if not isinstance(part.get("text"), str):
                raise where.error(
                    f"field '{at}.text' must be a string", f"{at}.text", "invalid_type"
                )
            texts.append(part["text"])
        return "".join(texts)
    if value is None:
        raise where.error(f"missing required field '{field}'", field, "missing_field")
    raise where.error(
        f"field '{field}' must be a string or a list of text parts, got {type_name(value)}",
        field,
        "invalid_type",
    )


def _message(
    m: Any, field: str, where: Where, limits: Limits, budget: _Budget, *, weights: bool
) -> dict[str, Any]:
    if not isinstance(m, Mapping):
        raise where.error(
            f"field '{field}' must be a message object, got {type_name(m)}", field, "invalid_type"
        )
    role = m.get("role")
    if role not in ROLES:
        shown = f"{role!r}" if isinstance(role, str) else type_name(role)
        raise where.error(
            f"field '{field}.role' must be one of {list(ROLES)}, got {shown[:64]}",
            f"{field}.role",
            "invalid_role",
        )
    if m.get("tool_calls") or m.get("function_call"):
        key = "tool_calls" if m.get("tool_calls") else "function_call"
        raise where.error(
            f"field '{field}.{key}': tool calls are not supported; only text turns are trained",
            f"{field}.{key}",
            "unsupported_content",
        )
    at = f"{field}.content"
    content = _content(m.get("content"), at, where)
    check_text(content, at, where, limits)
    if role == "assistant" and not content.strip():
        raise where.error(f"field '{at}' must not be empty", at, "empty_field")
    budget.spend(content, at, where, limits)
    out: dict[str, Any] = {"role": role, "content": content}
    if "weight" in m:
        weight = m["weight"]
        if not weights:
            raise where.error(
                f"field '{field}.weight': weights are for chat rows' assistant messages only",
                f"{field}.weight",
                "invalid_weight",
            )
        if role != "assistant":
            raise where.error(
                f"field '{field}.weight': only assistant messages have a weight",
                f"{field}.weight",
                "invalid_weight",
            )
        if isinstance(weight, bool) or weight not in (0, 1):
            raise where.error(
                f"field '{field}.weight' must be 0 or 1", f"{field}.weight", "invalid_weight"
            )
        out["weight"] = int(weight)
    return out


def _messages(
    value: Any, field: str, where: Where, limits: Limits, budget: _Budget, *, weights: bool
) -> list[dict[str, Any]]:
    if value is None:
        raise where.error(f"missing required field '{field}'", field, "missing_field")
    if not isinstance(value, list):
        raise where.error(
            f"field '{field}' must be an array of messages, got {type_name(value)}",
            field,
            "invalid_type",
        )
    if not value:
        raise where.error(f"field '{field}' must not be empty", field, "empty_field")
    if len(value) > limits.max_messages:
        raise where.error(
            f"field '{field}' has {len(value)} messages; at most {limits.max_messages} are allowed",
            field,
            "too_many_messages",
        )
    return [
        _message(m, f"{field}.{j}", where, limits, budget, weights=weights)
        for j, m in enumerate(value)
    ]


def _reply(value: Any, field: str, where: Where, limits: Limits, budget: _Budget) -> dict[str, Any]:
    """A DPO output: exactly one assistant message."""
    messages = _messages(value, field, where, limits, budget, weights=False)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise where.error(
            f"field '{field}' must hold exactly one assistant message, got "
            + ", ".join(m["role"] for m in messages),
            field,
            "invalid_output",
        )
    return messages[0]


def normalize_messages_row(
    kind: DatasetKind, obj: Mapping[str, Any], where: Where, limits: Limits
) -> dict[str, Any]:
    """A chat or DPO row, checked and normalised (see the module docstring)."""
    budget = _Budget(limits)
    if kind is DatasetKind.CHAT:
        messages = _messages(obj.get("messages"), "messages", where, limits, budget, weights=True)
        if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
            raise where.error(
                "field 'messages' has no assistant message to learn (none, or every one has "
                "weight 0)",
                "messages",
                "no_assistant_message",
            )
        first = messages[0]
        if first["role"] == "assistant" and first.get("weight", 1):
            # Its prompt would be no message at all, which the chat template cannot render
            # (the job failed with internal_error: IndexError).
            raise where.error(
                "field 'messages' starts with an assistant message to learn: it needs a "
                "system or user message before it (or weight 0)",
                "messages.0",
                "assistant_first",
            )
        return {"messages": messages}
    inp = obj.get("input")
    if inp is None:
        raise where.error("missing required field 'input'", "input", "missing_field")
    if not isinstance(inp, Mapping):
        raise where.error(
            f"field 'input' must be an object with messages, got {type_name(inp)}",
            "input",
            "invalid_type",
        )
    prompt = _messages(inp.get("messages"), "input.messages", where, limits, budget, weights=False)
    chosen = _reply(obj.get("preferred_output"), "preferred_output", where, limits, budget)
    rejected = _reply(
        obj.get("non_preferred_output"), "non_preferred_output", where, limits, budget
    )
    if chosen["content"] == rejected["content"]:
        # Identical replies carry no preference (and a zero gradient), as for preference rows.
        raise where.error(
            "'preferred_output' and 'non_preferred_output' are identical",
            "non_preferred_output",
            "identical_pair",
        )
    return {
        "input": {"messages": prompt},
        "preferred_output": [chosen],
        "non_preferred_output": [rejected],
    }
