"""Request and response bodies of ``/predict`` and ``/reward/compare``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_INPUTS = 256
MAX_PAIRS = 128
MAX_TEXT_CHARS = 100_000  # far beyond any model's window; the tokenizer truncates the rest

Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
OptionalText = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
Mode = Literal["auto", "unmerged", "merged"]


class TextPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Text
    text_pair: Text | None = None


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[Text | Annotated[list[Text], Field(min_length=2, max_length=2)] | TextPair] = (
        Field(min_length=1, max_length=MAX_INPUTS, description="texts, [text, pair] or objects")
    )
    # Inputs longer than the model's window are truncated unless this is false (then 422).
    truncate: bool = True


class Prediction(BaseModel):
    label: str | None = None
    score: float | None = None
    probabilities: dict[str, float] | None = None
    reward: float | None = None


class PredictResponse(BaseModel):
    object: Literal["prediction"] = "prediction"
    adapter: str
    mode: Mode
    task: str
    predictions: list[Prediction]


class ComparePair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: OptionalText | None = None
    response_a: Text
    response_b: Text


class CompareRequest(BaseModel):
    """Either one pair (``response_a``, ``response_b``, optional ``prompt``) or ``pairs``."""

    model_config = ConfigDict(extra="forbid")
    prompt: OptionalText | None = None
    response_a: Text | None = None
    response_b: Text | None = None
    pairs: list[ComparePair] | None = Field(None, min_length=1, max_length=MAX_PAIRS)
    truncate: bool = True


class CompareResult(BaseModel):
    reward_a: float
    reward_b: float
    p_a_preferred: float
    preferred: Literal["a", "b"]


class CompareResponse(CompareResult):
    object: Literal["reward.comparison"] = "reward.comparison"
    adapter: str


class CompareBatchResponse(BaseModel):
    object: Literal["list"] = "list"
    adapter: str
    results: list[CompareResult]
