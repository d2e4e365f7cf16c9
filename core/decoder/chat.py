"""OpenAI chat rows rendered with the model's own chat template into ids and a loss mask.

The mask is 1 on the tokens of the assistant turns to learn (the reply and its end-of-turn
token) and 0 on everything else: system and user turns, the template's role headers, and
assistant turns whose OpenAI ``weight`` is 0. Which characters are an assistant turn's is
found by rendering the conversation's prefixes (the prompt up to the turn, with the template's
generation prompt, then the prompt plus the turn), so any template that renders a conversation
as the concatenation of its turns works, without markers in the template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from core.decoder.forward import left_pad
from core.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTokens:
    """One rendered conversation: ``loss_mask[t]`` is 1 where token ``t`` is a target."""

    input_ids: list[int]
    loss_mask: list[int]


def _render(
    tokenizer: Any, template: str, messages: list[dict[str, str]], generation_prompt: bool
) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def _trained_spans(
    tokenizer: Any, template: str, messages: list[dict[str, str]], trained: list[int]
) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendered text and the character span of each trained assistant turn."""
    text = _render(tokenizer, template, messages, generation_prompt=False)
    spans = []
    for i in trained:
        if i == 0:  # no prompt to render (uploads refuse such a row)
            raise DataError("a trained assistant turn needs a message before it")
        prompt = _render(tokenizer, template, messages[:i], generation_prompt=True)
        with_turn = _render(tokenizer, template, messages[: i + 1], generation_prompt=False)
        if not (with_turn.startswith(prompt) and text.startswith(with_turn)):
            raise DataError(
                "the chat template does not render this conversation turn by turn, so its "
                "assistant tokens cannot be told apart"
            )
        # The turn's end-of-turn token is learnt (it is how a reply stops); the template's
        # whitespace after it is not.
        spans.append((len(prompt), len(with_turn.rstrip())))
    return text, spans


def render_chat(
    tokenizer: Any,
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    max_seq_length: int,
) -> ChatTokens:
    """Ids and loss mask of an OpenAI ``messages`` list, at most ``max_seq_length`` tokens.

    An over-long conversation loses tokens from the left of its context; the final trained
    assistant turn is kept whole when it fits in the window with one token before it, and
    otherwise keeps its beginning.
    """
    if template is None:
        raise DataError("this base has no chat template, so it cannot be trained on chat rows")
    if max_seq_length < 2:
        raise ValueError("max_seq_length must be at least 2")
    plain: list[dict[str, str]] = []
    trained: list[int] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise DataError(f"message {i} needs a role out of {ROLES} and a string content")
        plain.append({"role": role, "content": content})
        if role == "assistant" and message.get("weight", 1) != 0:
            trained.append(i)
    if not trained:
        raise DataError("no assistant message to learn (every one has weight 0, or none)")
    text, spans = _trained_spans(tokenizer, template, plain, trained)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    # A token that overlaps a trained span is a target.
    mask = [
        int(any(s < end and e > start for start, end in spans)) for s, e in enc["offset_mapping"]
    ]
    final_start = _first_target_in(enc, spans[-1])
    if len(ids) > max_seq_length:
        start = min(len(ids) - max_seq_length, max(final_start - 1, 0))
        ids, mask = ids[start : start + max_seq_length], mask[start : start + max_seq_length]
    mask[0] = 0  # the first token has nothing before it to be predicted from
    if not any(mask):
        # A one-token reply first in the window (a template that renders nothing before it, or
        # truncation): an all-masked row would make the batch's mean token loss 0/0.
        raise DataError("no reply token left to learn", field="messages")
    return ChatTokens(ids, mask)


def _first_target_in(enc: Mapping[str, Any], span: tuple[int, int]) -> int:
    start, end = span
    offsets = enc["offset_mapping"]
    first = next((t for t, (s, e) in enumerate(offsets) if s < end and e > start), None)
    if first is None:  # an empty reply under a template that adds no end-of-turn token
        raise DataError("the final assistant message renders to no tokens")
    return first


def render_reply(
    tokenizer: Any,
    template: str | None,
    prompt: Sequence[Mapping[str, Any]],
    reply: Mapping[str, Any],
    max_seq_length: int,
) -> ChatTokens:
    """A DPO side: ``prompt`` then ``reply``, with only the reply's tokens as targets."""
    context = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in prompt]
    return render_chat(tokenizer, template, [*context, {**reply, "weight": 1}], max_seq_length)


def collate(rows: Sequence[ChatTokens]) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, loss_mask)`` ``[B, longest]``, left padded."""
    ids, attention = left_pad([r.input_ids for r in rows])
    width = ids.shape[1]
    loss = torch.tensor([[0] * (width - len(r.loss_mask)) + r.loss_mask for r in rows])
    return ids, attention, loss
