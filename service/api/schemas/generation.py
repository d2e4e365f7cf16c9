"""Request and response bodies of ``/v1/chat/completions`` and ``/v1/completions``, in
OpenAI's shapes (so the official SDKs work unchanged). Fields loraplex does not implement
(tools, penalties, ``logit_bias`` ...) are refused with a 422 naming them, not ignored, unless
sent as what leaving them out means (null, or their neutral value). Numbers and booleans are
read strictly, as OpenAI reads them: ``"2"`` or ``true`` is no ``max_tokens``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    model_validator,
)
from pydantic.fields import FieldInfo

from service.names import NoControlCharacters

MAX_MESSAGES = 256
MAX_CONTENT_CHARS = 100_000
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_N = 16


def _is_zero(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


# OpenAI parameters loraplex does not implement, by the test for the value that asks for nothing:
# sent so (some clients always send the defaults) they mean what leaving them out means.
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "presence_penalty": _is_zero,
    "frequency_penalty": _is_zero,
    "logit_bias": lambda value: value == {},
    "echo": lambda value: value is False,
    "best_of": lambda value: value == 1 and not isinstance(value, bool),
}


def _check_stop(value: Any) -> Any:
    """``stop`` checked as one field: as a union of a string and a list, pydantic would report
    a bad list against the string member first ("stop.constrained-str: Input should be a valid
    string"), naming neither the field nor the problem."""
    if value is None:
        return None
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise ValueError("must be a string or a list of strings")
    if len(strings) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings")
    if any(not 1 <= len(s) <= MAX_STOP_CHARS for s in strings):
        raise ValueError(f"each stop string needs 1 to {MAX_STOP_CHARS} characters")
    return value


# The bounds are also in the types, so the OpenAPI document shows them.
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = Annotated[
    StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None,
    BeforeValidator(_check_stop),
]

MODEL = (
    "A decoder base id (`GET /v1/models`) or the name of one of your chat or DPO adapters "
    "(a fine-tuning job's `fine_tuned_model`)."
)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="Only text parts are read.")
    text: Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS)] = Field(
        description="The part's text; a message's parts are joined without separators."
    )


def _without_unset(
    data: Any, fields: dict[str, FieldInfo], neutral: dict[str, Callable[[Any], bool]] | None = None
) -> Any:
    """``data`` (a request object) less its nulls, but a required field's (left for the 422 to
    name it), and less the keys whose value ``neutral`` says asks for nothing."""
    if not isinstance(data, dict):
        return data
    neutral = neutral or {}
    return {
        key: value
        for key, value in data.items()
        if not (value is None and not (key in fields and fields[key].is_required()))
        and not (key in neutral and neutral[key](value))
    }


def _content_shape(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    return "parts" if isinstance(value, list) else None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"] = Field(description="Who says it.")
    # Tagged by the value's own type, so an error names the shape that was sent (a plain union
    # reported a list's bad part as "content.constrained-str: Input should be a valid string").
    content: Annotated[
        Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS), Tag("text")]
        | Annotated[list[TextPart], Field(max_length=64), Tag("parts")],
        Discriminator(
            _content_shape,
            custom_error_type="invalid_type",
            custom_error_message="Input should be a string or a list of text parts",
        ),
    ] = Field(description="The message's text, or its text parts.")
    name: str | None = Field(None, max_length=64, description="Accepted and not used.")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(
        False, strict=True, description="A last chunk with `usage` (and no choices)."
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_unset(cls, data: Any) -> Any:
        """``null`` is its default, as at the top level (:meth:`SamplingFields._drop_unset`)."""
        return _without_unset(data, cls.model_fields)


class SamplingFields(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, NoControlCharacters] = Field(
        min_length=1, max_length=256, description=MODEL
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="Tokens to generate at most; default: what the context leaves.",
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, strict=True, description="0: greedy.")
    top_p: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        strict=True,
        description="Sample from the likeliest tokens holding this mass.",
    )
    n: int = Field(
        1, ge=1, le=MAX_N, strict=True, description="Candidates, sharing one prompt prefill."
    )
    stop: Stop = Field(None, description="Up to 4 strings that end a candidate (not returned).")
    seed: int | None = Field(
        None,
        ge=0,
        lt=2**63,
        strict=True,
        description="Same seed and request, same text (candidate i samples with seed + i).",
    )
    stream: bool = Field(
        False,
        strict=True,
        description="Server-sent events as tokens are generated, then `data: [DONE]`.",
    )
    stream_options: StreamOptions | None = Field(None, description="With `stream` only.")
    user: str | None = Field(None, max_length=256, description="Accepted and not used.")
    mode: Literal["auto", "unmerged", "merged"] = Field(
        "auto",
        description="loraplex, for an adapter: `unmerged` adds its LoRA delta to each of its "
        "sequences' rows, in decode steps shared with any other adapters; `merged` runs the "
        "steps its sequences have alone (no other adapter or base in the batch) on a copy of "
        "the base with the adapter merged in; `auto` (default) merges only when it pays (that "
        "adapter alone, with 64 tokens or more left to generate) and runs on a merged copy "
        "already built whenever its adapter is alone. The same tokens up to float rounding; "
        "ignored for a base model.",
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_unset(cls, data: Any) -> Any:
        """Drop what OpenAI reads as not set: ``null`` for any parameter but a required one
        (the openai SDK sends null for a parameter given as None: a 422 here broke
        ``create(..., temperature=None)`` and ``presence_penalty=None``), and an unimplemented
        parameter's neutral value (``_NEUTRAL``)."""
        return _without_unset(data, cls.model_fields, _NEUTRAL)

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


CHAT_REQUEST_EXAMPLE = {
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 16,
    "temperature": 0,
}


class ChatCompletionRequest(SamplingFields):
    """A conversation to reply to."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [CHAT_REQUEST_EXAMPLE]}
    )
    messages: list[ChatMessage] = Field(
        min_length=1,
        max_length=MAX_MESSAGES,
        description="The conversation so far, rendered with the base's chat template.",
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, strict=True, description="`max_tokens`' new name."
    )
    logprobs: bool = Field(
        False, strict=True, description="Return each reply token's log-probability."
    )
    reward_adapter: Annotated[str | None, NoControlCharacters] = Field(
        None,
        min_length=1,
        max_length=256,
        description="loraplex: best-of-n. One of your reward adapters on the same base scores "
        "every candidate against the last user message; the choices come back best first, "
        "each with its `reward`. Not with `stream`.",
    )
    top_logprobs: int | None = Field(
        None, ge=0, le=20, strict=True, description="Needs `logprobs`."
    )


class CompletionRequest(SamplingFields):
    """A prompt to continue."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                    "prompt": "The capital of France is",
                    "max_tokens": 8,
                }
            ]
        },
    )
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CONTENT_CHARS)] = Field(
        description="The text to continue (no chat template)."
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=5,
        strict=True,
        description="Also return the logprobs of this many likeliest tokens.",
    )


USAGE_EXAMPLE = {
    "prompt_tokens": 36,
    "completion_tokens": 8,
    "total_tokens": 44,
    "prompt_tokens_details": {"cached_tokens": 24},
}
FINISH = "`stop`: a stop token or string ended it; `length`: `max_tokens` or the context did."


class PromptTokensDetails(BaseModel):
    """Where the prompt's tokens came from."""

    cached_tokens: int = Field(
        description="Prompt tokens whose keys and values were copied from the prefix cache (an "
        "earlier request of the same tenant and model started the same way) instead of "
        "computed; see generation_prefix_cache_mb."
    )


class Usage(BaseModel):
    """Tokens the request took."""

    prompt_tokens: int = Field(description="Tokens of the rendered prompt.")
    completion_tokens: int = Field(description="Tokens generated, over all candidates.")
    total_tokens: int = Field(description="The two added.")
    prompt_tokens_details: PromptTokensDetails = Field(
        description="How many of the prompt's tokens were cached."
    )

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class TopLogprob(BaseModel):
    """A token and its log-probability under the model."""

    token: str = Field(description="The token's text.")
    logprob: float = Field(description="Its log-probability (before temperature and top_p).")
    bytes: list[int] = Field(description="The UTF-8 bytes of `token`.")


class TokenLogprobOut(TopLogprob):
    """A generated token, with the likeliest alternatives at its position."""

    top_logprobs: list[TopLogprob] = Field(description="`top_logprobs` likeliest, best first.")


class ChoiceLogprobs(BaseModel):
    """Log-probabilities of a reply's tokens."""

    content: list[TokenLogprobOut] = Field(description="One per generated token.")


class AssistantMessage(BaseModel):
    """The generated reply."""

    role: Literal["assistant"] = Field("assistant", description="Always `assistant`.")
    content: str = Field(description="The reply's text.")


class ChatChoice(BaseModel):
    """One candidate reply."""

    index: int = Field(description="Which of the `n` candidates.")
    message: AssistantMessage = Field(description="The reply.")
    finish_reason: Literal["stop", "length"] = Field(description=FINISH)
    logprobs: ChoiceLogprobs | None = Field(None, description="With `logprobs` only.")
    reward: float | None = Field(None, description="With `reward_adapter`: its score.")


class ChatCompletion(BaseModel):
    """The replies to a conversation."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "chatcmpl-5f0c8e2a9b7d4c1e8f3a6b2d9c0e1f47",
                    "object": "chat.completion",
                    "created": 1764950400,
                    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": "The capital of France is Paris.",
                            },
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": USAGE_EXAMPLE,
                }
            ]
        }
    )
    id: str = Field(description="This response's id.")
    object: Literal["chat.completion"] = Field("chat.completion", description="The type.")
    created: int = Field(description="Unix seconds when the request arrived.")
    model: str = Field(description="The `model` of the request.")
    choices: list[ChatChoice] = Field(description="The `n` candidates.")
    usage: Usage = Field(description="Tokens the prompt and the candidates took.")


class Delta(BaseModel):
    """What a chunk adds to a candidate's reply."""

    role: Literal["assistant"] | None = Field(None, description="In each candidate's first.")
    content: str | None = Field(None, description="New text; complete characters only.")


class ChunkChoice(BaseModel):
    """One candidate's part of a chunk."""

    index: int = Field(description="Which of the `n` candidates.")
    delta: Delta = Field(description="The new text.")
    finish_reason: Literal["stop", "length"] | None = Field(None, description=FINISH)
    logprobs: ChoiceLogprobs | None = Field(None, description="The chunk's tokens' logprobs.")


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str = Field(description="The response's id, the same in every chunk.")
    object: Literal["chat.completion.chunk"] = Field(
        "chat.completion.chunk", description="The type."
    )
    created: int = Field(description="Unix seconds when the request arrived.")
    model: str = Field(description="The `model` of the request.")
    choices: list[ChunkChoice] = Field(description="Empty in the usage chunk.")
    usage: Usage | None = Field(None, description="In the last chunk, with `include_usage`.")


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str] = Field(description="Each generated token's text.")
    token_logprobs: list[float] = Field(description="Each token's log-probability.")
    top_logprobs: list[dict[str, float]] = Field(description="The likeliest tokens per position.")
    text_offset: list[int] = Field(description="Where each token starts in the text.")


class CompletionChoice(BaseModel):
    """One candidate continuation (or a streamed piece of one)."""

    index: int = Field(description="Which of the `n` candidates.")
    text: str = Field(description="The continuation's text.")
    finish_reason: Literal["stop", "length"] | None = Field(None, description=FINISH)
    logprobs: CompletionLogprobs | None = Field(None, description="With `logprobs` only.")


class Completion(BaseModel):
    """The continuations of a prompt (streamed: one chunk of them)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "cmpl-5f0c8e2a9b7d4c1e8f3a6b2d9c0e1f47",
                    "object": "text_completion",
                    "created": 1764950400,
                    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                    "choices": [{"index": 0, "text": " Paris.", "finish_reason": "stop"}],
                    "usage": USAGE_EXAMPLE,
                }
            ]
        }
    )
    id: str = Field(description="This response's id.")
    object: Literal["text_completion"] = Field("text_completion", description="The type.")
    created: int = Field(description="Unix seconds when the request arrived.")
    model: str = Field(description="The `model` of the request.")
    choices: list[CompletionChoice] = Field(description="The `n` candidates.")
    usage: Usage | None = Field(None, description="Tokens the request took.")
