"""What training will make of a preference dataset's pairs, counted at upload.

Two counts, stored with the dataset and shown in its dry-run report:

- ``split_rows``: rows without a ``prompt`` whose ``chosen`` and ``rejected`` are one dialogue
  up to a turn boundary. Training (``split_shared_prefix``, on by default) uses the shared
  dialogue as the prompt and what follows as the two responses
  (:func:`core.pair_encoding.split_shared_prefix`, the function training calls).
- ``identical_pairs``: rows whose two responses (after that split) differ only in case,
  accents or spacing, which an uncased WordPiece tokenizer such as the default base's does not
  see: they become one input, teach nothing and score as ties. The job's first event reports
  the same count under the same name once the texts are tokenized and truncated, so it adds
  the pairs that differ only past the training window.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from core.pair_encoding import split_shared_prefix


def _as_tokenized(text: str) -> str:
    """``text`` as far as the encoder base's tokenizer tells texts apart (all-MiniLM-L6-v2's
    uncased WordPiece: it strips accents, lower-cases and splits on whitespace): no accents,
    no case, whitespace runs as one space. The upload has no base at hand; the job's count,
    made with the base's own tokenizer, is the exact one."""
    decomposed = unicodedata.normalize("NFD", text)
    plain = "".join(c for c in decomposed if unicodedata.category(c) != "Mn")
    return " ".join(plain.casefold().split())


def pair_report(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """``{"split_rows", "identical_pairs"}`` of normalised preference rows."""
    split = identical = 0
    for row in rows:
        chosen, rejected = row["chosen"], row["rejected"]
        parts = None if "prompt" in row else split_shared_prefix(chosen, rejected)
        if parts is not None:
            split += 1
            _, chosen, rejected = parts
        identical += _as_tokenized(chosen) == _as_tokenized(rejected)
    return {"split_rows": split, "identical_pairs": identical}
