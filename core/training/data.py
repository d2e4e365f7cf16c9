"""Training data: example types, validation, splits, tokenization once, length-bucketed batches.

Rows are tokenized once, up front, into plain lists of token ids; each batch is padded only to
its own longest row ("dynamic padding"). Batches are formed by :class:`BucketSampler`, a pure
function of ``(seed, epoch)``, so a checkpoint needs only ``(epoch, batch index)`` to resume the
exact same batch sequence.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from core.errors import DataError
from core.pair_encoding import encode_responses, split_shared_prefix
from core.training.config import batches_per_epoch, held_out_rows, nothing_held_out

# How many batches' worth of rows are sorted by length together. Larger buckets pad less but
# make batch composition less random; 50 is the usual compromise (e.g. fairseq, AllenNLP).
BUCKET_BATCHES = 50


@dataclass(frozen=True)
class ClassificationExample:
    text: str
    label: str
    text_pair: str | None = None


@dataclass(frozen=True)
class PreferenceExample:
    """A preference pair. ``prompt`` is encoded as the first text of a pair with each response.

    ``margin`` (optional) overrides the configured margin for this pair, as TRL's ``margin``
    column does.
    """

    chosen: str
    rejected: str
    prompt: str | None = None
    margin: float | None = None


Example = ClassificationExample | PreferenceExample
# Rows of any task, a decoder's too (split_validation splits them all alike).
AnyExample = TypeVar("AnyExample")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _text(value: Any, row: int, field: str, where: str, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where} data: expected a string", row, field)
    if not value.strip():
        if not required:
            return None  # an empty optional text (prompt, text_pair) means "none"
        raise DataError(f"{where} data: empty text", row, field)
    return value


def _get(row: Any, key: str) -> Any:
    return row.get(key) if isinstance(row, Mapping) else getattr(row, key, None)


def coerce_examples(rows: Iterable[Any], task: str, where: str = "training") -> list[Example]:
    """Check rows (dicts or example objects) and return typed examples.

    Raises :class:`DataError` naming the 0-based row and the field. Unknown keys are ignored
    (fixtures carry e.g. ``movie_name``); the service bounds sizes before this is called.
    """
    out: list[Example] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping | ClassificationExample | PreferenceExample):
            raise DataError(f"{where} data: expected an object", i)
        if task == "classification":
            label = _get(row, "label")
            if isinstance(label, bool) or not isinstance(label, str | int):
                raise DataError(f"{where} data: label must be a string or an integer", i, "label")
            out.append(
                ClassificationExample(
                    text=_text(_get(row, "text"), i, "text", where),  # type: ignore[arg-type]
                    label=str(label),
                    text_pair=_text(_get(row, "text_pair"), i, "text_pair", where, False),
                )
            )
        elif task == "reward":
            margin = _get(row, "margin")
            if margin is not None and (
                isinstance(margin, bool) or not isinstance(margin, int | float)
            ):
                raise DataError(f"{where} data: margin must be a number", i, "margin")
            out.append(
                PreferenceExample(
                    chosen=_text(_get(row, "chosen"), i, "chosen", where),  # type: ignore[arg-type]
                    rejected=_text(_get(row, "rejected"), i, "rejected", where),  # type: ignore[arg-type]
                    prompt=_text(_get(row, "prompt"), i, "prompt", where, False),
                    margin=None if margin is None else float(margin),
                )
            )
        else:
            raise ValueError(f"unknown task {task!r}")
    if not out:
        raise DataError(f"{where} data is empty")
    return out


def split_dialogues(examples: list[Example]) -> tuple[list[Example], int]:
    """Preference rows without a prompt whose texts are one dialogue up to a turn boundary,
    as that shared dialogue (the prompt) and the two responses (core.pair_encoding); and how
    many rows were split."""
    out: list[Example] = []
    for e in examples:
        parts = None
        if isinstance(e, PreferenceExample) and e.prompt is None:
            parts = split_shared_prefix(e.chosen, e.rejected)
        if parts is not None:
            e = PreferenceExample(parts[1], parts[2], parts[0], e.margin)  # type: ignore[union-attr]
        out.append(e)
    return out, sum(a is not b for a, b in zip(examples, out, strict=True))


def infer_label_names(examples: Sequence[Example]) -> list[str]:
    """Sorted distinct labels: a stable label order that does not depend on row order."""
    return sorted({e.label for e in examples if isinstance(e, ClassificationExample)})


def check_labels(examples: Sequence[Example], label_names: Sequence[str], where: str) -> None:
    known = set(label_names)
    for i, e in enumerate(examples):
        if isinstance(e, ClassificationExample) and e.label not in known:
            raise DataError(
                f"{where} data: unknown label {e.label!r}; known: {sorted(known)}", i, "label"
            )


def check_classes(examples: Sequence[Example]) -> None:
    labels = {e.label for e in examples if isinstance(e, ClassificationExample)}
    if len(labels) < 2:
        raise DataError(f"training data has one class only ({sorted(labels)}): need two or more")


def has_pairs(examples: Sequence[Example]) -> int | None:
    """Index of the first row carrying a second text (text_pair / prompt), None if none."""
    for i, e in enumerate(examples):
        second = e.text_pair if isinstance(e, ClassificationExample) else e.prompt
        if second is not None:
            return i
    return None


# --------------------------------------------------------------------------------------------
# Train / validation split
# --------------------------------------------------------------------------------------------


def split_validation(
    examples: Sequence[AnyExample], fraction: float, seed: int, required: bool = True
) -> tuple[list[AnyExample], list[AnyExample]]:
    """Seeded split; stratified by label for classification (each class keeps its share).

    ``random.Random(seed)`` is used (not torch) because its shuffle is stable across versions
    and platforms: the same job always holds out the same rows. Where ``fraction`` holds out
    no row: a :class:`DataError`, or, not ``required`` (the default fraction, which nobody
    asked for), every row trains and none validates.
    """
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        key = e.label if isinstance(e, ClassificationExample) else ""
        groups.setdefault(key, []).append(i)
    val_idx: list[int] = []
    for key in sorted(groups):
        idx = groups[key]
        rng.shuffle(idx)
        n_val = held_out_rows(len(idx), fraction)
        val_idx.extend(idx[:n_val])
    if not val_idx:
        if not required:
            return list(examples), []
        raise DataError(nothing_held_out(len(examples), fraction))
    held = set(val_idx)
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [examples[i] for i in sorted(held)]
    return train, val


# --------------------------------------------------------------------------------------------
# Tokenization (once) and batches (padded per batch)
# --------------------------------------------------------------------------------------------


@dataclass
class EncodedData:
    """Token ids per example. Preference examples hold two sequences: (chosen, rejected)."""

    ids: list[tuple[list[int], ...]]
    types: list[tuple[list[int], ...]]
    labels: Tensor | None  # classification: label index per example
    margins: Tensor | None  # preference: margin per example
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> list[int]:
        """Padded length each example costs (the longer of its sequences)."""
        return [max(len(s) for s in seqs) for seqs in self.ids]

    def token_count(self, indices: Sequence[int]) -> int:
        """Tokens of the selected examples, padding excluded (all sequences of a pair)."""
        return sum(len(s) for i in indices for s in self.ids[i])

    def identical_pairs(self) -> int:
        """Pairs whose two sequences are the same input: their texts differ only where the
        encoding cut them or the tokenizer does not see (case, accents, spacing)."""
        return sum(
            len(seqs) == 2 and seqs[0] == seqs[1] and types[0] == types[1]
            for seqs, types in zip(self.ids, self.types, strict=True)
        )

    def fingerprint(self) -> str:
        """sha256 of ids and targets: a checkpoint is only resumed on the data it was cut from."""
        h = hashlib.sha256()
        for seqs, types in zip(self.ids, self.types, strict=True):
            for s, t in zip(seqs, types, strict=True):
                h.update(repr((s, t)).encode())
        for t in (self.labels, self.margins):
            if t is not None:
                h.update(repr(t.tolist()).encode())
        return h.hexdigest()

    def collate(self, indices: Sequence[int], device: torch.device) -> dict[str, Tensor]:
        """Pad the selected examples to their longest sequence.

        With two sequences per example (preference) the batch holds all first sequences, then
        all second ones (``[chosen..., rejected...]``), so one forward scores both.
        """
        n_seq = len(self.ids[indices[0]])
        rows = [self.ids[i][k] for k in range(n_seq) for i in indices]
        type_rows = [self.types[i][k] for k in range(n_seq) for i in indices]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        token_types = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (r, t) in enumerate(zip(rows, type_rows, strict=True)):
            input_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            token_types[j, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[j, : len(r)] = 1
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": mask.to(device),
            "token_type_ids": token_types.to(device),
        }

    def targets(self, indices: Sequence[int], device: torch.device) -> Tensor:
        """Label indices (classification) or per-pair margins (preference) of a batch."""
        src = self.labels if self.labels is not None else self.margins
        assert src is not None
        return src[torch.as_tensor(list(indices), dtype=torch.long)].to(device)


def _tokenize(
    tokenizer: Any, firsts: list[str], seconds: list[str | None], max_length: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and type ids; single texts and pairs are tokenized in two calls."""
    ids: list[list[int]] = [[] for _ in firsts]
    types: list[list[int]] = [[] for _ in firsts]
    singles = [i for i, s in enumerate(seconds) if s is None]
    pairs = [i for i, s in enumerate(seconds) if s is not None]
    for group, with_pair in ((singles, False), (pairs, True)):
        if not group:
            continue
        enc = tokenizer(
            [firsts[i] for i in group],
            [seconds[i] for i in group] if with_pair else None,
            truncation=True,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=True,
        )
        for j, i in enumerate(group):
            ids[i] = list(enc["input_ids"][j])
            types[i] = list(enc["token_type_ids"][j])
    return ids, types


def encode(
    examples: Sequence[Example],
    tokenizer: Any,
    max_length: int,
    label_names: Sequence[str] = (),
    default_margin: float = 0.0,
) -> EncodedData:
    """Tokenize every example once (truncated to ``max_length``, not padded)."""
    pad_id = int(getattr(tokenizer, "pad_token_id", 0) or 0)
    if isinstance(examples[0], ClassificationExample):
        cls_ex = [e for e in examples if isinstance(e, ClassificationExample)]
        ids, types = _tokenize(
            tokenizer, [e.text for e in cls_ex], [e.text_pair for e in cls_ex], max_length
        )
        index = {name: i for i, name in enumerate(label_names)}
        labels = torch.tensor([index[e.label] for e in cls_ex], dtype=torch.long)
        return EncodedData(
            ids=[(s,) for s in ids],
            types=[(t,) for t in types],
            labels=labels,
            margins=None,
            pad_id=pad_id,
        )
    pref = [e for e in examples if isinstance(e, PreferenceExample)]
    # Chosen then rejected, each as serving encodes a response (core.pair_encoding).
    encoded = encode_responses(
        tokenizer,
        [e.prompt for e in pref] * 2,
        [e.chosen for e in pref] + [e.rejected for e in pref],
        max_length,
    )
    ids = [i for i, _ in encoded]
    types = [t for _, t in encoded]
    n = len(pref)
    margins = torch.tensor(
        [default_margin if e.margin is None else e.margin for e in pref], dtype=torch.float32
    )
    return EncodedData(
        ids=[(ids[i], ids[n + i]) for i in range(n)],
        types=[(types[i], types[n + i]) for i in range(n)],
        labels=None,
        margins=margins,
        pad_id=pad_id,
    )


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"loraplex.sampler:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class BucketSampler:
    """Deterministic batches per epoch: a pure function of ``(seed, epoch)``.

    With bucketing, a seeded permutation is cut into buckets of ``BUCKET_BATCHES`` batches,
    each bucket is sorted by length (stable, so equal lengths stay in random order) and cut
    into batches, and the order of all batches is shuffled. Rows in a batch then have similar
    lengths (little padding) while batch order stays random. Without bucketing, batches are
    consecutive slices of the permutation.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int, bucket_by_length: bool = True
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.bucket_by_length = bucket_by_length

    def __len__(self) -> int:
        return batches_per_epoch(len(self.lengths), self.batch_size)

    def batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        b = self.batch_size
        if not self.bucket_by_length:
            return [perm[i : i + b] for i in range(0, len(perm), b)]
        out: list[list[int]] = []
        chunk = BUCKET_BATCHES * b
        for start in range(0, len(perm), chunk):
            bucket = sorted(perm[start : start + chunk], key=self.lengths.__getitem__)
            out.extend(bucket[i : i + b] for i in range(0, len(bucket), b))
        order = torch.randperm(len(out), generator=g).tolist()
        return [out[i] for i in order]


# Padded tokens one forward pass runs (all sequences of its rows), for rows up to
# FULL_BUDGET_WIDTH tokens wide; wider rows get proportionally fewer, as attention's memory
# grows with the square of the width. A batch past it runs in chunks of rows, each forward and
# backward freeing its activations before the next, which makes no difference to the gradient
# (the loss is a mean over rows) and little to the speed. Peak RSS of a process training a
# MiniLM LoRA reward model at the default batch (16 pairs, 32 sequences), 2-core CPU: at 256
# tokens 4.2 GiB in one forward, 1.1 GiB in chunks of 1,024 tokens; at 128 tokens 2.2 GiB and
# 1.4 GiB (chunks of 2,048). The worker must stay within 2 GiB. The default classification
# batch (16 rows x 128 tokens) still runs as one forward, as before.
MAX_FORWARD_TOKENS = 2048
FULL_BUDGET_WIDTH = 128


class TokenizedRows(Protocol):
    """Rows of one or more token sequences each (a pair's chosen and rejected): what
    :func:`forward_chunks` cuts; :class:`EncodedData` and a decoder's rows are such."""

    @property
    def ids(self) -> Sequence[tuple[list[int], ...]]: ...


def forward_chunks(
    data: TokenizedRows, indices: list[int], max_tokens: int | None = None
) -> list[list[int]]:
    """``indices`` cut into consecutive chunks within the forward budget of ``max_tokens``
    padded tokens (None: ``MAX_FORWARD_TOKENS``, the encoder's) (at least one row each); a
    pair's two sequences stay in one chunk."""
    width = max(len(s) for i in indices for s in data.ids[i])
    tokens = MAX_FORWARD_TOKENS if max_tokens is None else max_tokens
    budget = tokens * min(1.0, FULL_BUDGET_WIDTH / width)
    size = max(1, int(budget) // (width * len(data.ids[indices[0]])))
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Validation batches sorted by length (order does not matter for aggregate metrics)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
