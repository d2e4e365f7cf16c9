"""How a reward model's input becomes token ids: one function for training and for serving.

A preference row is a (prompt, response) pair; what a reward model must tell apart is the
response. The tokenizer's own truncation cuts from the right, which on long dialogues (the
whole HH-RLHF conversation as ``chosen`` / ``rejected``) cut exactly the final turns where the
two differ: at 128 tokens 52 of issue 15's 463 held-out HH pairs became one input. So here the
response keeps the window first, up to all of it but :data:`PROMPT_SHARE` when there is a
prompt, and the prompt fills what is left from its end: its most recent turns survive, the
start of a long dialogue is what is cut.

The layout is the tokenizer's own pair layout (``[CLS] prompt [SEP] response [SEP]``, token
types 0 then 1), or ``[CLS] response [SEP]`` without a prompt. Texts are cut by characters
before the tokenizer sees them (:data:`MAX_CHARS_PER_TOKEN`), at a word boundary so the ids of
the cut are those of the whole text, and a cut that holds too few tokens is widened: a row
costs its window to encode, not its length.

Rows given as two whole dialogues (HH-RLHF and chat-transcript exports: ``chosen`` and
``rejected`` are the same conversation up to the final assistant turn) carry their prompt
inside both texts. :func:`split_shared_prefix` finds it: the shared start up to the last turn
marker both texts have becomes the prompt, and what follows in each is its response. Encoded
whole instead, the model spends its window on the shared dialogue (held-out HH pair accuracy
0.551 against 0.601 split, issue 15). Training splits such rows unless
``split_shared_prefix`` is off; the service counts them at upload.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Characters a text is cut to per token of its window before tokenizing. English averages ~4
# characters per WordPiece token (all-MiniLM's vocabulary on prose: 3.1), code and URLs fewer
# (they split at every punctuation mark); 20 leaves room for runs of long words. Texts that
# still hold fewer tokens than the window in that many characters (long runs of whitespace,
# which the tokenizer drops; words over 100 characters, which become one [UNK]) are re-cut
# twice as long until they fill it, so the cut never changes the ids, only the cost.
MAX_CHARS_PER_TOKEN = 20

# The share of the window a prompt keeps however long the response is (when the prompt has
# that many tokens): a quarter, 64 of 256 tokens, holds the last human turn of nearly every
# HH-RLHF dialogue, and leaves a response 189 tokens before it is cut.
PROMPT_SHARE = 4

# Turn markers of the HH-RLHF transcript format (which many chat exports share). A boundary is
# the end of a marker, so a split prompt ends with whose turn comes next.
TURN_MARKERS = ("\n\nHuman:", "\n\nAssistant:")

Ids = tuple[list[int], list[int]]  # (input_ids, token_type_ids)


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """``(prompt, chosen, rejected)`` with the two texts' shared dialogue as the prompt, or
    None when they share no turn boundary or a response would be left empty."""
    pairs = zip(chosen, rejected, strict=False)
    shared = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(chosen), len(rejected)))
    # The end of the last marker lying wholly inside the shared start.
    ends = [at + len(m) for m in TURN_MARKERS if (at := chosen.rfind(m, 0, shared)) >= 0]
    if not ends:
        return None
    cut = max(ends)
    prompt, chosen, rejected = chosen[:cut].strip(), chosen[cut:].strip(), rejected[cut:].strip()
    if not prompt or not chosen or not rejected:
        return None
    return prompt, chosen, rejected


def cut_at_word(text: str, chars: int, keep_end: bool) -> str:
    """At most ``chars`` characters of ``text`` from its start (or its end), cut at whitespace
    so no word is split. Without whitespace inside the cut (CJK, a long URL) it is cut there
    anyway: an empty cut would be widened to the whole text, a row costing its length to
    tokenize; only the token at the cut's edge may differ, and a full window leaves it out."""
    if len(text) <= chars:
        return text
    if keep_end:
        part = text[-chars:]
        space = next((i for i, c in enumerate(part) if c.isspace()), None)
        return part if space is None else part[space:]
    part = text[:chars]
    space = next((i for i in range(len(part) - 1, -1, -1) if part[i].isspace()), None)
    return part if space is None else part[:space]


def bounded_ids(
    tokenizer: Any, texts: Sequence[str], limit: int, keep_end: bool
) -> list[list[int]]:
    """The first (``keep_end``: last) ``limit`` token ids of each whole text, no special
    tokens, reading about ``limit * MAX_CHARS_PER_TOKEN`` characters of it."""
    out: list[list[int]] = [[] for _ in texts]
    chars = [limit * MAX_CHARS_PER_TOKEN] * len(texts)
    todo = list(range(len(texts)))
    while todo:
        cuts = [cut_at_word(texts[i], chars[i], keep_end) for i in todo]
        # verbose=False: no warning that a text is longer than the model; it is cut below.
        enc = tokenizer(
            cuts,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        again = []
        for i, cut, ids in zip(todo, cuts, enc, strict=True):
            if len(ids) < limit and len(cut) < len(texts[i]):
                chars[i] *= 2  # the cut may have dropped tokens the window has room for
                again.append(i)
            else:
                out[i] = list(ids[-limit:] if keep_end else ids[:limit])
        todo = again
    return out


def encode_responses(
    tokenizer: Any, prompts: Sequence[str | None], responses: Sequence[str], max_length: int
) -> list[Ids]:
    """Ids and token types of each ``(prompt, response)`` in ``max_length`` tokens: the
    response from its start, the prompt (when there is one) from its end."""
    single = int(tokenizer.num_special_tokens_to_add(pair=False))
    pair = int(tokenizer.num_special_tokens_to_add(pair=True))
    response_ids = bounded_ids(tokenizer, responses, max_length - single, keep_end=False)
    with_prompt = [i for i, p in enumerate(prompts) if p is not None]
    tails = bounded_ids(tokenizer, [prompts[i] or "" for i in with_prompt], max_length - pair, True)
    prompt_ids = dict(zip(with_prompt, tails, strict=True))
    out: list[Ids] = []
    for i, response in enumerate(response_ids):
        context = prompt_ids.get(i)
        if not context:  # no prompt, or one the tokenizer makes nothing of
            ids = response[: max_length - single]
            out.append(
                (
                    tokenizer.build_inputs_with_special_tokens(ids),
                    tokenizer.create_token_type_ids_from_sequences(ids),
                )
            )
            continue
        budget = max_length - pair
        kept = min(len(response), budget - min(len(context), budget // PROMPT_SHARE))
        response = response[:kept]
        context = context[max(0, len(context) - (budget - kept)) :]
        out.append(
            (
                tokenizer.build_inputs_with_special_tokens(context, response),
                tokenizer.create_token_type_ids_from_sequences(context, response),
            )
        )
    return out
