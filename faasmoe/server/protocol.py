"""The OpenAI-compatible wire format: request bodies (validated here, once) and response bodies.

Unknown request fields are ignored, as OpenAI-compatible servers do, so clients that send `user` or
penalties at their defaults work; unsupported values of known fields are refused.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from faasmoe.model.sampling import SEED_MAX, SEED_MIN

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_LOGPROBS = 5  # completions' logprobs
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs

# The types state the limits for the OpenAPI schema; the before-validators say what is wrong more clearly.
Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
StopStrings = Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)]
BATCH_OF_ONE = Field(min_length=1, max_length=1)  # OpenAI's prompt may be a batch; one prompt per request here
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # what an unpaired \ud800-\udfff JSON escape decodes to


def _no_lone_surrogates(value: Any) -> Any:
    """Text the server tokenizes, compares or echoes must be encodable as UTF-8 (checked before parsing)."""
    if isinstance(value, str) and _LONE_SURROGATE.search(value):
        raise ValueError("the text holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)")
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        _no_lone_surrogates(item)
    return value


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationFields(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy; any value above 0 is computed")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="the nucleus always keeps the likeliest token")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="torch.Generator's range: -2**63..2**64-1")
    stop: Text | StopStrings | None = Field(None, validate_default=True)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extensions
    ignore_eos: bool = False
    return_token_ids: bool = False

    _text_fields = field_validator("model", "stop", mode="before")(_no_lone_surrogates)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop: Any) -> Any:
        """Normalised to a list; anything but a string, a list or null is left to the type's check."""
        stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if isinstance(stops, list) and (len(stops) > MAX_STOP_STRINGS or any(s == "" for s in stops)):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
        return stops

    @property
    def stop_strings(self) -> list[str]:
        return self.stop  # type: ignore[return-value]  # normalised to a list by the validator

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerationFields):
    prompt: Text | TokenIds | Annotated[list[Text], BATCH_OF_ONE] | Annotated[list[TokenIds], BATCH_OF_ONE]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Literal[False] = False

    _text_prompt = field_validator("prompt", mode="before")(_no_lone_surrogates)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        """One prompt per request (a batch of one is unwrapped): text or token ids, not empty."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ValueError("one prompt per request is supported; send several requests instead")
            prompt = prompt[0]
        if isinstance(prompt, str | list) and len(prompt) == 0:
            raise ValueError("the prompt is empty")
        return prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    _text_messages = field_validator("messages", mode="before")(_no_lone_surrogates)

    @model_validator(mode="after")
    def _newer_max_tokens(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprobs_count(self) -> int | None:
        """How many alternatives per token the engine reports; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- responses ----


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "faasmoe"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# What the generation endpoints answer, as documented in the OpenAPI schema (completions.py builds the
# bodies; the API fuzz test holds them to these models). token_ids and prompt_token_ids are vLLM's.


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    token_ids: list[int] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None


class ServerSentEvent(BaseModel):
    """One event of a streamed answer: a chunk object, an error object, or [DONE] last, as JSON text."""

    data: str


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ApiError(Exception):
    """An error answered with an OpenAI-style error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))
        self.headers = headers
