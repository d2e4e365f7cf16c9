"""Request and response bodies of ``/predict`` and ``/reward/compare``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag

from service.api.schemas.generation import Usage
from service.serving.policy import RequestMode

MAX_INPUTS = 256
MAX_PAIRS = 128
MAX_TEXT_CHARS = 100_000  # far beyond any window; only what the window needs is tokenized

# The most JSON one character of a text can take: "\\ud83d\\ude00" spells one in 12 bytes.
MAX_JSON_BYTES_PER_CHAR = 12
# Room for each input's or pair's framing (keys, quotes, commas, indentation), and the body's.
_FRAMING_BYTES_PER_ITEM = 256
_FRAMING_BYTES = 4096


def max_body_bytes(max_request_chars: int) -> int:
    """The largest body a valid ``/predict`` or ``/reward/compare`` request can be: the most
    characters its texts may hold (``max_request_chars`` in all, and no more than
    ``MAX_INPUTS`` text pairs or ``MAX_PAIRS`` three-text pairs hold), each at its longest
    JSON spelling, plus framing. Anything larger is refused (413) before it is read."""
    texts = max(2 * MAX_INPUTS, 3 * MAX_PAIRS)
    chars = min(max_request_chars, texts * MAX_TEXT_CHARS)
    items = max(MAX_INPUTS, MAX_PAIRS)
    return MAX_JSON_BYTES_PER_CHAR * chars + _FRAMING_BYTES_PER_ITEM * items + _FRAMING_BYTES


Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
OptionalText = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]

ADAPTER_NAME = "The adapter that answered."
TRUNCATE = (
    "Truncate texts longer than the model's window (default). False refuses them with a 422 "
    "naming the input instead."
)
PROMPT = (
    "The prompt both responses answer; encoded as the first text of each pair. Left out, two "
    "whole dialogues (HH-RLHF's `\\n\\nHuman:` / `\\n\\nAssistant:` turns) are split at "
    "their last shared turn, as training split them, when the adapter was trained with "
    "`split_shared_prefix` (the default)."
)


class TextPair(BaseModel):
    """Two texts classified together, for adapters trained on rows with `text_pair`."""

    model_config = ConfigDict(extra="forbid")
    text: Text = Field(description="The first text.")
    text_pair: Text | None = Field(None, description="The second text; null for a single text.")


def _input_shape(value: object) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else None


# Tagged by the value's own type, so an error names the shape that was sent: a plain union
# answered `[5]` or `[""]` with "inputs.0.constrained-str: ... (and 2 more errors)", the
# string branch's complaint, even for an item meant as a pair.
PredictInput = Annotated[
    Annotated[Text, Tag("text")]
    | Annotated[list[Text], Field(min_length=2, max_length=2), Tag("array")]
    | Annotated[TextPair, Tag("object")],
    Discriminator(
        _input_shape,
        custom_error_type="invalid_type",
        custom_error_message="Input should be a text, a [text, text_pair] array or a "
        "{text, text_pair} object",
    ),
]


class PredictRequest(BaseModel):
    """Texts to classify or score with one adapter."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "inputs": [
                        "A delight from start to finish.",
                        ["Is it good?", "Two hours I will never get back."],
                        {"text": "Is it good?", "text_pair": "Yes, very."},
                    ]
                }
            ]
        },
    )
    inputs: list[PredictInput] = Field(
        min_length=1,
        max_length=MAX_INPUTS,
        description=f"Up to {MAX_INPUTS} inputs, each a text, a `[text, text_pair]` array or "
        "a `{text, text_pair}` object; answered in order.",
    )
    truncate: bool = Field(True, description=TRUNCATE)
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Chat and DPO adapters (and a decoder base named in `adapter`): tokens to "
        "generate at most per input; by default, and at most, `LORAPLEX_PREDICT_MAX_TOKENS` "
        "(256). Refused for classifiers and reward models.",
    )
    temperature: float | None = Field(
        None,
        ge=0.0,
        le=2.0,
        description="Chat and DPO adapters: 0 (the default) generates greedily, the likeliest "
        "token each step; above 0 samples. Refused for classifiers and reward models.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        lt=2**63,
        description="Chat and DPO adapters, with `temperature` above 0: the same seed and "
        "request give the same texts. Refused for classifiers and reward models.",
    )


FinishReason = Literal["stop", "length"]


class Prediction(BaseModel):
    """One input's result: a label with probabilities (classification), a reward, or the
    generated reply (chat and DPO adapters)."""

    label: str | None = Field(None, description="Classification: the most probable label.")
    score: float | None = Field(None, description="Classification: the label's probability.")
    probabilities: dict[str, float] | None = Field(
        None, description="Classification: the probability of every label."
    )
    reward: float | None = Field(
        None, description="Reward adapters: the score; higher means preferred."
    )
    text: str | None = Field(
        None,
        description="Chat and DPO adapters: the reply generated to the input, sent as the "
        "user's message rendered with the base's chat template.",
    )
    finish_reason: FinishReason | None = Field(
        None,
        description="Chat and DPO adapters: `stop` at the end-of-turn token, `length` at "
        "`max_tokens`.",
    )
    usage: Usage | None = Field(
        None, description="Chat and DPO adapters: the input's prompt and reply tokens."
    )


class PredictResponse(BaseModel):
    """Predictions in the order of the inputs."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "object": "prediction",
                    "adapter": "sentiment-lora",
                    "mode": "unmerged",
                    "task": "classification",
                    "predictions": [
                        {
                            "label": "fresh",
                            "score": 0.91,
                            "probabilities": {"fresh": 0.91, "rotten": 0.09},
                        }
                    ],
                }
            ]
        }
    )

    object: Literal["prediction"] = Field("prediction", description="Always `prediction`.")
    adapter: str = Field(description=ADAPTER_NAME)
    mode: RequestMode = Field(
        description="The `mode` asked for: `auto` lets the server choose per batch (a merged "
        "copy for an adapter that dominates recent traffic), `unmerged` shares one forward "
        "pass with other adapters, `merged` uses LoRA weights merged into a copy of the base."
    )
    task: str = Field(
        description="`classification`, `reward`, or `chat` / `dpo` (generated `text`, its "
        "`finish_reason` and `usage`): which fields each result has."
    )
    predictions: list[Prediction] = Field(description="One result per input, in order.")


class ComparePair(BaseModel):
    """One comparison: two responses, optionally to a prompt."""

    model_config = ConfigDict(extra="forbid")
    prompt: OptionalText | None = Field(None, description=PROMPT)
    response_a: Text = Field(description="The first response.")
    response_b: Text = Field(description="The second response.")


class CompareRequest(BaseModel):
    """Either one pair (`response_a`, `response_b`, optional `prompt`) or `pairs`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "Summarise the film in one line.",
                    "response_a": "A heist goes wrong and the crew turns on itself.",
                    "response_b": "It is a movie.",
                },
                {
                    "pairs": [
                        {"response_a": "Clear and kind.", "response_b": "Whatever."},
                        {"prompt": "Hi?", "response_a": "Hello!", "response_b": "No."},
                    ]
                },
            ]
        },
    )
    prompt: OptionalText | None = Field(
        None,
        description=f"{PROMPT} One-pair form only: each of `pairs` has its own (sent beside "
        "`pairs`, it is a 422).",
    )
    response_a: Text | None = Field(None, description="The first response (one-pair form).")
    response_b: Text | None = Field(None, description="The second response (one-pair form).")
    pairs: list[ComparePair] | None = Field(
        None,
        min_length=1,
        max_length=MAX_PAIRS,
        description=f"Up to {MAX_PAIRS} comparisons in one call, instead of the one-pair fields.",
    )
    truncate: bool = Field(True, description=TRUNCATE)


class CompareResult(BaseModel):
    """The reward model's verdict on one pair."""

    reward_a: float = Field(description="Reward of `response_a`.")
    reward_b: float = Field(description="Reward of `response_b`.")
    p_a_preferred: float = Field(
        description="Probability that `response_a` is preferred: sigmoid(reward_a - reward_b), "
        "as in Bradley-Terry reward-model training."
    )
    preferred: Literal["a", "b"] = Field(
        description="`a` when `p_a_preferred` is at least 0.5, else `b`."
    )


_RESULT_EXAMPLE = {"reward_a": 1.42, "reward_b": -0.87, "p_a_preferred": 0.91, "preferred": "a"}


class CompareResponse(CompareResult):
    """The verdict on the one pair sent."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"object": "reward.comparison", "adapter": "helpful-rm", **_RESULT_EXAMPLE}
            ]
        }
    )

    object: Literal["reward.comparison"] = Field(
        "reward.comparison", description="Always `reward.comparison`."
    )
    adapter: str = Field(description=ADAPTER_NAME)


class CompareBatchResponse(BaseModel):
    """The verdicts on `pairs`, in order."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"object": "list", "adapter": "helpful-rm", "results": [_RESULT_EXAMPLE]}]
        }
    )

    object: Literal["list"] = Field("list", description="Always `list`.")
    adapter: str = Field(description=ADAPTER_NAME)
    results: list[CompareResult] = Field(description="One verdict per pair, in order.")
