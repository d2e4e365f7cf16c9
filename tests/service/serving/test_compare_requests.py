"""/reward/compare's errors name the field the client sent (a pair's prompt or response, not a
row of the two the server makes of each pair), a top-level prompt beside ``pairs`` is refused
rather than ignored, and LORAPLEX_MAX_REQUEST_CHARS counts each text sent once."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.state import app_state
from tests.core.inference.helpers import random_adapter
from tests.service.helpers import SMALL_REQUEST_CHARS, Headers, assert_error, store_adapter

URL = "/reward/compare?adapter=rm"
LIMIT = SMALL_REQUEST_CHARS


def _store_rm(client: TestClient, auth: Headers, split: bool = False) -> None:
    base = app_state(client.app).require_base_model()
    adapter = random_adapter(base, "lora", {"r": 2}, None, seed=3)
    head = adapter.head.model_copy(update={"split_shared_prefix": split})
    store_adapter(client, auth, "rm", replace(adapter, head=head))


def _long(client: TestClient) -> str:
    """A text longer than the model's window on its own."""
    return " ".join(["word"] * app_state(client.app).require_base_model().max_length)


@pytest.mark.parametrize(
    ("pair", "param", "says"),
    [
        ({"response_b": "LONG"}, "pairs.1.response_b", "pairs.1.response_b is "),
        ({"response_a": "LONG"}, "pairs.1.response_a", "pairs.1.response_a is "),
        ({"prompt": "LONG"}, "pairs.1.prompt", "pairs.1.prompt with response_a is "),
        (
            {"prompt": "a short prompt", "response_b": "LONG"},
            "pairs.1.response_b",
            "pairs.1.response_b with its prompt is ",
        ),
    ],
)
def test_an_input_too_long_names_the_pairs_field(
    serving_client: TestClient, auth: Headers, pair: dict[str, str], param: str, says: str
) -> None:
    _store_rm(serving_client, auth)
    long = _long(serving_client)
    second = {"response_a": "x", "response_b": "y", **pair}
    second = {k: long if v == "LONG" else v for k, v in second.items()}
    body = {"pairs": [{"response_a": "x", "response_b": "y"}, second], "truncate": False}
    resp = serving_client.post(URL, json=body, headers=auth)
    assert_error(resp, 422, param=param, code="input_too_long", contains=says)


@pytest.mark.parametrize("field", ["prompt", "response_a", "response_b"])
def test_an_input_too_long_in_the_one_pair_form_names_its_field(
    serving_client: TestClient, auth: Headers, field: str
) -> None:
    _store_rm(serving_client, auth)
    body: dict[str, Any] = {"response_a": "x", "response_b": "y", "truncate": False}
    body[field] = _long(serving_client)
    resp = serving_client.post(URL, json=body, headers=auth)
    assert_error(resp, 422, param=field, code="input_too_long")
    body["truncate"] = True
    assert serving_client.post(URL, json=body, headers=auth).status_code == 200


@pytest.mark.parametrize("prompt", ["z", ""])
def test_a_top_level_prompt_beside_pairs_is_refused(
    serving_client: TestClient, auth: Headers, prompt: str
) -> None:
    _store_rm(serving_client, auth)
    body = {"prompt": prompt, "pairs": [{"response_a": "x", "response_b": "y"}]}
    assert_error(serving_client.post(URL, json=body, headers=auth), 422, param="prompt")


def test_a_pairs_prompt_counts_once_against_max_request_chars(
    small_client: TestClient, auth: Headers
) -> None:
    _store_rm(small_client, auth)
    pair = {"prompt": "p" * 1000, "response_a": "x", "response_b": "y"}
    fits = small_client.post(URL, json={"pairs": [pair] * 3}, headers=auth)  # 3,006 characters
    assert fits.status_code == 200, fits.text
    one = small_client.post(URL, json={**pair, "prompt": "p" * (LIMIT - 2)}, headers=auth)
    assert one.status_code == 200, one.text

    over = small_client.post(URL, json={"pairs": [pair] * 4}, headers=auth)
    assert_error(over, 413, param="pairs", code="request_too_large", contains="hold 4008 ")


def test_whole_dialogues_count_as_sent(small_client: TestClient, auth: Headers) -> None:
    """Split at their shared turns, two dialogues still count with those turns in both."""
    _store_rm(small_client, auth, split=True)
    shared = "\n\nHuman: " + "is it good " * 190 + "\n\nAssistant:"  # 2,111 characters
    whole = {"response_a": f"{shared} yes", "response_b": f"{shared} no"}
    over = small_client.post(URL, json=whole, headers=auth)
    assert_error(over, 413, param="pairs", code="request_too_large", contains="hold 4229 ")
