"""Reward models and classifiers on a decoder base: last-token pooling, one encoding for
training and scoring, and the batched scoring function a service calls.

What the head reads: the final (normed) hidden state of each row's last real token, the one
state of a causal model that has seen the whole input (as transformers'
``LlamaForSequenceClassification`` and TRL's reward models read it). Its index comes from the
attention mask, so rows padded on the right (the trainer's batches) and on the left (the
generation engine's) pool the same token.

How a row becomes ids (:func:`encode_scored_turns`, for training and scoring alike): the
base's chat template renders the prompt as a user message and the response as an assistant
message (a classification text is a user message, its ``text_pair`` the assistant's reply),
ending at the final message's end-of-turn token.
Over-long rows are cut as :mod:`core.pair_encoding` cuts the encoder's pairs: the response
keeps the window from its start, up to all of it but a ``PROMPT_SHARE`` of it when there is a
prompt, and the rendered context (system turn, prompt, the assistant header) fills the rest
from its end, so the prompt's most recent words survive and the conversation's start is what is
cut. Texts are cut by characters before they are rendered (``MAX_CHARS_PER_TOKEN`` per token of
the window, widened until the cut lies outside the window), so a row costs its window to
encode, not its length, and the ids are those of the whole text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from core.decoder.base import DecoderBase
from core.decoder.forward import DecoderWeights, LinearHooks, forward
from core.errors import DataError
from core.heads import Head
from core.methods.method import AdapterMethod
from core.pair_encoding import MAX_CHARS_PER_TOKEN, PROMPT_SHARE, cut_at_word

# Rows per forward when scoring (no gradients: activations are freed layer by layer).
SCORE_BATCH_SIZE = 16


def last_token_index(attention_mask: Tensor) -> Tensor:
    """``[B]`` index of each row's last real token, whichever side the padding is on."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).argmax(-1)


def last_token_states(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """``[B, hidden]``: each row's final hidden state at its last real token."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask)]


# Stand-ins for the texts while the template's own text around them is found: private-use
# characters, which no template writes.
_PROMPT_MARK, _RESPONSE_MARK = "\ue000", "\ue001"


def _render(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


def _messages(prompt: str | None, response: str, role: str) -> list[dict[str, str]]:
    head = [] if prompt is None else [{"role": "user", "content": prompt}]
    return [*head, {"role": role, "content": response}]


def _encode_row(
    tokenizer: Any,
    template: str,
    prompt: str | None,
    response: str,
    role: str,
    max_length: int,
    chars: int,
) -> tuple[list[int], bool]:
    """Ids of one row in ``max_length`` tokens, and whether a character cut (``chars`` per
    text) reached into the window (then the caller widens it and encodes the row again)."""
    prompt_cut = None if prompt is None else cut_at_word(prompt, chars, keep_end=True)
    response_cut = cut_at_word(response, chars, keep_end=False)
    # The template's own text: before the prompt, between the turns, after the response.
    if prompt is None:
        marks = _render(tokenizer, template, _messages(None, _RESPONSE_MARK, role))
        before, between, after = "", *marks.split(_RESPONSE_MARK)
    else:
        marks = _render(tokenizer, template, _messages(_PROMPT_MARK, _RESPONSE_MARK, role))
        before, rest = marks.split(_PROMPT_MARK)
        between, after = rest.split(_RESPONSE_MARK)
    text = _render(tokenizer, template, _messages(prompt_cut, response_cut, role))
    # The row ends with the response's end-of-turn token, as a reply stops generating there
    # (the template's whitespace after it carries nothing).
    trailing = len(after) - len(after.rstrip())
    text, after = text[: len(text) - trailing], after.rstrip()
    if not (text.startswith(before) and text.endswith(after)):
        raise DataError("the chat template does not render this row turn by turn")
    middle = text[len(before) : len(text) - len(after)]
    # The prompt as the template wrote it: whole, or stripped (templates that trim texts).
    shown = ""
    if prompt_cut is not None:
        fits = [c for c in (prompt_cut, prompt_cut.strip()) if middle.startswith(c + between)]
        if not fits:
            raise DataError("the chat template does not render this row turn by turn")
        shown = fits[0]
    start = len(before) + len(shown) + len(between)  # the response's first character
    end = len(text) - len(after)  # past its last
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets: list[tuple[int, int]] = enc["offset_mapping"]

    def token_at(char: int) -> int:
        return next((t for t, (_, e) in enumerate(offsets) if e > char), len(ids))

    first = token_at(start)
    n_context, n_response = first, len(ids) - first
    kept = min(n_response, max_length - min(n_context, max_length // PROMPT_SHARE))
    lo, hi = max(0, n_context - (max_length - kept)), first + kept
    widen = False
    if prompt is not None and prompt_cut is not None and len(prompt_cut) < len(prompt):
        widen |= token_at(len(before)) >= lo  # the cut's first token is inside the window
    if len(response_cut) < len(response):
        widen |= token_at(end - 1) < hi  # the cut's last token is inside the window
    return ids[lo:hi], widen


def encode_scored_turns(
    tokenizer: Any,
    template: str | None,
    prompts: Sequence[str | None],
    responses: Sequence[str],
    max_length: int,
    *,
    role: str = "assistant",
) -> list[list[int]]:
    """Token ids of each ``(prompt, response)`` in at most ``max_length`` tokens.

    The prompt (None: none) is a user message and the response a ``role`` message (a
    classification text without a pair is one ``"user"`` message), rendered with
    ``template``; the response is kept from its start, the context from its end (module
    docstring). Raises :class:`DataError` without a chat template.
    """
    if template is None:
        raise DataError("this base has no chat template, so it cannot render rows to score")
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    out: list[list[int]] = []
    for prompt, response in zip(prompts, responses, strict=True):
        chars = max_length * MAX_CHARS_PER_TOKEN
        while True:
            ids, widen = _encode_row(tokenizer, template, prompt, response, role, max_length, chars)
            if not widen:
                break
            chars *= 2
        out.append(ids)
    return out


class DecoderHeadModel(nn.Module):
    """A decoder base + one method + a head on the last token: the encoder's
    :class:`core.model.AdaptedModel` for a decoder (the same ``forward(batch, dropout)``)."""

    def __init__(self, base: DecoderBase, method: AdapterMethod, head: Head) -> None:
        super().__init__()
        self._base = [base]  # not a submodule: its weights are shared and frozen
        self.method = method
        self.head = head

    @property
    def base(self) -> DecoderBase:
        return self._base[0]

    def weights(self) -> DecoderWeights:
        """Full fine-tuning's own copy, else the shared base's (LoRA adapts them by hooks)."""
        own = getattr(self.method, "decoder_weights", None)
        return own() if own is not None else self.base.weights

    def prefix(self) -> Tensor | None:
        """Prompt tuning's virtual token embeddings, put before every row."""
        own = getattr(self.method, "prefix", None)
        return own() if own is not None else None

    def features(self, batch: dict[str, Tensor], dropout: bool = False) -> Tensor:
        """``[B, hidden]``: the adapted decoder's state at each row's last real token."""
        hooks: LinearHooks = self.method.hooks(dropout)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        hidden = forward(self.weights(), ids, mask, hooks=hooks, prefix=self.prefix())
        return last_token_states(hidden, mask)

    def forward(self, batch: dict[str, Tensor], dropout: bool = False) -> Tensor:
        """Logits ``[B, n_labels]`` for classification, rewards ``[B]`` for reward heads."""
        return self.head(self.features(batch, dropout), dropout)


def right_pad(rows: Sequence[list[int]], device: torch.device) -> dict[str, Tensor]:
    """``{"input_ids", "attention_mask"}`` ``[B, longest]``, padded on the right with 0."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def score_decoder_pairs(
    model: DecoderHeadModel,
    prompts: Sequence[str | None],
    responses: Sequence[str],
    *,
    batch_size: int = SCORE_BATCH_SIZE,
) -> Tensor:
    """Rewards ``[N]`` (float32, CPU) of ``N`` ``(prompt, response)`` pairs under a decoder
    reward adapter (``Adapter.build_decoder_head``); a prompt of None scores the response alone.

    Encoded as the adapter was trained (:func:`encode_scored_turns` at the head's
    ``max_seq_length``); rows run ``batch_size`` to a forward, in length order (padding
    changes no score), without gradients. Best-of-n and ``/reward/compare`` on a decoder
    adapter call this; comparing two whole dialogues without a prompt is the caller's split
    (``core.pair_encoding.split_shared_prefix`` when the head's ``split_shared_prefix``).
    """
    if model.head.config.task != "reward":
        raise ValueError(f"a {model.head.config.task!r} head gives no reward")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    base = model.base
    window = model.head.config.window(base.max_length - model.method.config.reserved_positions)
    rows = encode_scored_turns(base.tokenizer, base.chat_template, prompts, responses, window)
    out = torch.empty(len(rows), dtype=torch.float32)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        with torch.inference_mode():
            scores = model(right_pad([rows[i] for i in idx], base.device))
        out[idx] = scores.float().cpu()
    return out
