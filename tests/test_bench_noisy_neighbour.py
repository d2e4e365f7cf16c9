"""bench.noisy_neighbour's loads are the largest the server accepts, and one step past it."""

from __future__ import annotations

import json

from bench.common import fixture_reviews
from bench.noisy_neighbour import dataset_body, predict_body
from service.api.schemas.inference import MAX_INPUTS, MAX_TEXT_CHARS, PredictRequest


def total_chars(body: bytes) -> int:
    return sum(len(t) for t in json.loads(body)["inputs"])


def test_predict_bodies_straddle_the_character_bound() -> None:
    texts = [r["text"] for r in fixture_reviews()]
    limit = 2_000_000
    accepted, over = predict_body(texts, limit), predict_body(texts, limit + MAX_INPUTS)
    # The schema takes both (its own bounds: inputs and characters per text) ...
    for body in (accepted, over):
        request = PredictRequest.model_validate_json(body)
        assert len(request.inputs) == MAX_INPUTS
    # ... and only the character bound tells them apart: at it, then just past it.
    assert limit - MAX_INPUTS < total_chars(accepted) <= limit < total_chars(over)


def test_predict_body_keeps_each_text_within_the_schema() -> None:
    texts = [r["text"] for r in fixture_reviews()]
    body = predict_body(texts, MAX_INPUTS * MAX_TEXT_CHARS * 2)
    assert {len(t) for t in json.loads(body)["inputs"]} == {MAX_TEXT_CHARS}


def test_dataset_body_is_the_largest_under_the_upload_bound() -> None:
    rows = fixture_reviews()
    max_bytes = 200_000
    body = dataset_body(rows, max_bytes, max_rows=10_000)
    parsed = json.loads(body)
    assert parsed["kind"] == "classification"
    records = parsed["records"]
    assert records[: len(rows)] == rows[: len(records)]
    next_row = json.dumps(rows[len(records) % len(rows)]).encode()
    assert len(body) <= max_bytes < len(body) + len(next_row) + 2
    assert len(dataset_body(rows, max_bytes, max_rows=7)) < max_bytes
    assert len(json.loads(dataset_body(rows, max_bytes, max_rows=7))["records"]) == 7
