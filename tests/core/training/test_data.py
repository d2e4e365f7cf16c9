from __future__ import annotations

from collections import Counter

import pytest
import torch

from core.errors import DataError
from core.training.data import (
    BucketSampler,
    ClassificationExample,
    PreferenceExample,
    check_classes,
    check_labels,
    coerce_examples,
    encode,
    eval_batches,
    infer_label_names,
    split_validation,
)
from tests.core.training.conftest import preference_rows, sentiment_rows

# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "row", "field"),
    [
        ([{"text": "good", "label": "a"}, {"text": "  ", "label": "b"}], 1, "text"),
        ([{"text": "good", "label": "a"}, {"label": "b"}], 1, "text"),
        ([{"text": "good", "label": None}], 0, "label"),
        ([{"text": "good", "label": "a"}, {"text": 3, "label": "b"}], 1, "text"),
    ],
)
def test_classification_errors_name_the_row(rows: list, row: int, field: str) -> None:
    with pytest.raises(DataError) as e:
        coerce_examples(rows, "classification")
    assert (e.value.row, e.value.field) == (row, field)
    assert f"row {row}" in str(e.value)


def test_preference_errors_name_the_row() -> None:
    rows = [{"chosen": "a", "rejected": "b"}, {"chosen": "a", "rejected": ""}]
    with pytest.raises(DataError) as e:
        coerce_examples(rows, "reward")
    assert (e.value.row, e.value.field) == (1, "rejected")
    with pytest.raises(DataError) as e:
        coerce_examples([{"chosen": "a", "rejected": "b", "margin": "x"}], "reward")
    assert e.value.field == "margin"


def test_coerce_types_and_optional_texts() -> None:
    ex = coerce_examples([{"text": "x", "label": 3, "text_pair": "", "extra": 1}], "classification")
    assert ex == [ClassificationExample("x", "3", None)]
    pe = coerce_examples([{"prompt": "", "chosen": "a", "rejected": "b", "margin": 1}], "reward")
    assert pe == [PreferenceExample("a", "b", None, 1.0)]
    with pytest.raises(DataError):
        coerce_examples([], "classification")


def test_labels_unknown_and_one_class() -> None:
    train = coerce_examples(sentiment_rows(10), "classification")
    assert infer_label_names(train) == ["neg", "pos"]
    val = coerce_examples(
        [{"text": "good", "label": "pos"}, {"text": "meh", "label": "meh"}], "classification"
    )
    with pytest.raises(DataError) as e:
        check_labels(val, ["neg", "pos"], "validation")
    assert e.value.row == 1 and e.value.field == "label" and "validation" in str(e.value)
    with pytest.raises(DataError, match="one class"):
        check_classes([ClassificationExample("a", "x"), ClassificationExample("b", "x")])


# --- split -----------------------------------------------------------------------------------


def test_split_is_stratified_seeded_and_disjoint() -> None:
    rows = sentiment_rows(30) + [{"text": "so so", "label": "mid"}] * 10
    ex = coerce_examples(rows, "classification")
    train, val = split_validation(ex, 0.2, seed=3)
    assert len(train) + len(val) == len(ex)
    counts = Counter(e.label for e in val)
    assert counts == {"pos": 3, "neg": 3, "mid": 2}  # 20 % of 15, 15 and 10
    again = split_validation(ex, 0.2, seed=3)
    assert again == (train, val)
    assert split_validation(ex, 0.2, seed=4)[1] != val


def test_split_too_few_rows() -> None:
    ex = coerce_examples(sentiment_rows(4), "classification")
    with pytest.raises(DataError, match="too few rows") as e:
        split_validation(ex, 0.1, seed=0)
    assert e.value.row is None


# --- tokenization and batches ----------------------------------------------------------------


def test_encode_and_collate_classification(tiny_base) -> None:
    ex = coerce_examples(
        [
            {"text": "good movie", "label": "pos"},
            {"text": "the film was really bad", "label": "neg", "text_pair": "plot"},
        ],
        "classification",
    )
    data = encode(ex, tiny_base.tokenizer, 64, ["neg", "pos"])
    assert data.labels.tolist() == [1, 0]
    assert isinstance(data.ids[0][0], list)  # stored unpadded
    assert data.lengths == [4, 9]  # [CLS] good movie [SEP] / ... [SEP] plot [SEP]
    b = data.collate([0, 1], torch.device("cpu"))
    assert b["input_ids"].shape == (2, 9)
    assert b["attention_mask"].sum(1).tolist() == [4, 9]
    assert b["token_type_ids"][1].tolist()[-2:] == [1, 1]
    assert b["token_type_ids"][0].sum() == 0
    ref = tiny_base.tokenize(["the film was really bad"], ["plot"])
    assert b["input_ids"][1].tolist() == ref["input_ids"][0].tolist()
    short = data.collate([0], torch.device("cpu"))
    assert short["input_ids"].shape == (1, 4)  # padded per batch only


def test_encode_truncates(tiny_base) -> None:
    ex = coerce_examples([{"text": "good " * 100, "label": "pos"}], "classification")
    assert encode(ex, tiny_base.tokenizer, 16, ["neg", "pos"]).lengths == [16]


def test_preference_batch_concatenates_chosen_then_rejected(tiny_base) -> None:
    ex = coerce_examples(preference_rows(3) + preference_rows(1, prompt=False), "reward")
    data = encode(ex, tiny_base.tokenizer, 64, default_margin=0.5)
    assert data.margins.tolist() == [0.5] * 4
    b = data.collate([0, 3], torch.device("cpu"))
    assert b["input_ids"].shape[0] == 4  # [chosen0, chosen3, rejected0, rejected3]
    chosen0 = tiny_base.tokenize(["this movie"], [preference_rows(3)[0]["chosen"]])
    n = int(chosen0["attention_mask"].sum())
    assert b["input_ids"][0, :n].tolist() == chosen0["input_ids"][0].tolist()
    rejected3 = tiny_base.tokenize([preference_rows(1, prompt=False)[0]["rejected"]])
    m = int(rejected3["attention_mask"].sum())
    assert b["input_ids"][3, :m].tolist() == rejected3["input_ids"][0].tolist()
    assert b["token_type_ids"][3].sum() == 0 and b["token_type_ids"][2].sum() > 0


def test_bucketing_similar_lengths_and_seeded() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 120, (1000,), generator=gen).tolist()
    s = BucketSampler(lengths, batch_size=10, seed=7, bucket_by_length=True)
    batches = s.batches(0)
    assert len(batches) == len(s) == 100
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    plain = BucketSampler(lengths, 10, 7, bucket_by_length=False).batches(0)
    plain_spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain]
    assert sum(spread) / len(spread) < 0.1 * sum(plain_spread) / len(plain_spread)
    # Batch order is shuffled (not sorted by length) ...
    firsts = [lengths[b[0]] for b in batches]
    assert firsts != sorted(firsts)
    # ... deterministically per (seed, epoch), and differently across epochs and seeds.
    assert BucketSampler(lengths, 10, 7).batches(0) == batches
    assert s.batches(1) != batches
    assert BucketSampler(lengths, 10, 8).batches(0) != batches


def test_partial_last_batch_and_eval_batches() -> None:
    s = BucketSampler([3, 1, 2, 5, 4], batch_size=2, seed=0)
    batches = s.batches(0)
    assert len(batches) == 3 and sorted(len(b) for b in batches) == [1, 2, 2]
    assert eval_batches([3, 1, 2, 5, 4], 2) == [[1, 2], [0, 4], [3]]
