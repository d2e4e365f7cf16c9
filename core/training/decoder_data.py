"""A decoder's training rows: OpenAI chat rows (task ``chat``) and DPO rows (task ``dpo``).

Rows are checked (a :class:`DataError` names the row and the field), rendered once with the
base's own chat template into ids and loss masks (:mod:`core.decoder.chat`), and batched like
the encoder's rows: :class:`DecoderData` has the ``ids`` / ``lengths`` / ``token_count`` /
``fingerprint`` the sampler, the forward budget and checkpoints read.

Shapes, as OpenAI's fine-tuning files have them::

    chat: {"messages": [{"role": "system" | "user" | "assistant", "content": "...",
                         "weight": 0 | 1 (assistant only, optional)}, ...]}
    dpo:  {"input": {"messages": [...]},
           "preferred_output": [{"role": "assistant", "content": "..."}],
           "non_preferred_output": [{"role": "assistant", "content": "..."}]}
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from core.decoder.chat import ROLES, ChatTokens, collate, render_chat, render_reply
from core.errors import DataError

DECODER_TASKS = ("chat", "dpo")

Message = dict[str, Any]


@dataclass(frozen=True)
class ChatExample:
    messages: list[Message]


@dataclass(frozen=True)
class DpoExample:
    prompt: list[Message]  # the input messages, none of them trained
    chosen: Message  # the preferred assistant reply
    rejected: Message


DecoderExample = ChatExample | DpoExample


def _messages(value: Any, row: int, field: str, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} data: expected a non-empty list of messages", row, field)
    out: list[Message] = []
    for j, m in enumerate(value):
        at = f"{field}[{j}]"
        if not isinstance(m, Mapping):
            raise DataError(f"{where} data: a message is an object", row, at)
        if m.get("role") not in ROLES:
            raise DataError(f"{where} data: role must be one of {list(ROLES)}", row, f"{at}.role")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where} data: content must be a string", row, f"{at}.content")
        message: Message = {"role": m["role"], "content": m["content"]}
        if "weight" in m:
            weight = m["weight"]
            if m["role"] != "assistant" or isinstance(weight, bool) or weight not in (0, 1):
                raise DataError(
                    f"{where} data: weight (0 or 1) is only for assistant messages",
                    row,
                    f"{at}.weight",
                )
            message["weight"] = int(m["weight"])
        out.append(message)
    return out


def _reply(value: Any, row: int, field: str, where: str) -> Message:
    messages = _messages(value, row, field, where)
    if len(messages) != 1 or messages[0]["role"] != "assistant" or "weight" in messages[0]:
        raise DataError(f"{where} data: expected one assistant message", row, field)
    return messages[0]


def coerce_decoder_examples(
    rows: Iterable[Any], task: str, where: str = "training"
) -> list[DecoderExample]:
    """Check OpenAI chat or DPO rows; unknown keys (OpenAI's ``tools``...) are ignored."""
    out: list[DecoderExample] = []
    for i, row in enumerate(rows):
        if isinstance(row, ChatExample | DpoExample):
            out.append(row)
            continue
        if not isinstance(row, Mapping):
            raise DataError(f"{where} data: expected an object", i)
        if task == "chat":
            messages = _messages(row.get("messages"), i, "messages", where)
            if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
                raise DataError(
                    f"{where} data: no assistant message to learn (none, or all weight 0)",
                    i,
                    "messages",
                )
            out.append(ChatExample(messages))
        else:
            inp = row.get("input")
            if not isinstance(inp, Mapping):
                raise DataError(f"{where} data: expected an object with messages", i, "input")
            prompt = _messages(inp.get("messages"), i, "input.messages", where)
            out.append(
                DpoExample(
                    prompt,
                    _reply(row.get("preferred_output"), i, "preferred_output", where),
                    _reply(row.get("non_preferred_output"), i, "non_preferred_output", where),
                )
            )
    if not out:
        raise DataError(f"{where} data: no rows")
    return out


@dataclass
class DecoderData:
    """Rendered rows: one sequence each (chat) or two, chosen then rejected (DPO)."""

    rows: list[tuple[ChatTokens, ...]]

    def __post_init__(self) -> None:
        # Token ids per row, as forward_chunks reads them (once, not per batch).
        self.ids: list[tuple[list[int], ...]] = [
            tuple(s.input_ids for s in seqs) for seqs in self.rows
        ]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> list[int]:
        """Padded length each row costs (the longer of its sequences)."""
        return [max(len(s.input_ids) for s in seqs) for seqs in self.rows]

    def token_count(self, indices: Sequence[int]) -> int:
        """Tokens of the selected rows, padding excluded (both sequences of a pair)."""
        return sum(len(s.input_ids) for i in indices for s in self.rows[i])

    def target_count(self, indices: Sequence[int]) -> int:
        """Tokens the selected rows are trained to predict (their loss masks' ones)."""
        return sum(sum(s.loss_mask) for i in indices for s in self.rows[i])

    def fingerprint(self) -> str:
        """sha256 of ids and loss masks: a checkpoint resumes only on the data it was cut from."""
        h = hashlib.sha256()
        for seqs in self.rows:
            for s in seqs:
                h.update(repr((s.input_ids, s.loss_mask)).encode())
        return h.hexdigest()

    def collate(
        self, indices: Sequence[int], device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(input_ids, attention_mask, loss_mask)``, left padded; with pairs all chosen
        sequences come first, then all rejected ones, so one forward scores both."""
        n_seq = len(self.rows[indices[0]])
        batch = collate([self.rows[i][k] for k in range(n_seq) for i in indices])
        return batch[0].to(device), batch[1].to(device), batch[2].to(device)


def encode_decoder(
    examples: Sequence[DecoderExample],
    tokenizer: Any,
    template: str | None,
    max_length: int,
    where: str = "training",
) -> DecoderData:
    """Render every row once with the base's chat template (truncated from the left)."""
    rows: list[tuple[ChatTokens, ...]] = []
    for i, e in enumerate(examples):
        try:
            if isinstance(e, ChatExample):
                seqs: tuple[ChatTokens, ...] = (
                    render_chat(tokenizer, template, e.messages, max_length),
                )
            else:
                seqs = tuple(
                    render_reply(tokenizer, template, e.prompt, reply, max_length)
                    for reply in (e.chosen, e.rejected)
                )
        except DataError as err:
            raise DataError(f"{where} data: {err.message}", i, err.field) from None
        rows.append(seqs)
    return DecoderData(rows)
