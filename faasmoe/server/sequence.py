"""A generation request as the engine sees it, and the events it streams back."""

from __future__ import annotations

import asyncio
import enum
import itertools
import uuid
from dataclasses import dataclass, field

from faasmoe.model.sampling import Sampler, SamplingParams
from faasmoe.model.trunk import SequenceState


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # client went away
    ERROR = "error"


class FailureKind(str, enum.Enum):
    SEQUENCE = "sequence"  # this sequence's own work (sampling, logprobs, decoding) failed: only it ends
    FUNCTION = "function"  # an expert function answered an error: the step's batch ends
    FUNCTION_UNAVAILABLE = "function_unavailable"  # no replica answered (unreachable, busy) after retries
    ENGINE = "engine"  # the step failed in the control plane itself


@dataclass(frozen=True)
class Failure:
    """Why a sequence ended in error, told to its tenant without internal detail (that goes to the log)."""

    kind: FailureKind
    function: str | None = None  # the failing function, for FUNCTION and FUNCTION_UNAVAILABLE


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class GenerationRequest:
    tenant: str
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None  # how many top alternatives to return per token (0: only the chosen one)
    request_id: str = field(default_factory=new_request_id)  # names the request in the log and in its errors


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, or the end of the stream (finish_reason set; token_id may be None)."""

    token_id: int | None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: FinishReason | None = None
    failure: Failure | None = None  # set with FinishReason.ERROR


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """A request being served: its KV cache, sampler, output so far and where its events go."""

    request: GenerationRequest
    state: SequenceState | None  # None once finished: the KV cache is freed
    events: asyncio.Queue[TokenEvent]
    loop: asyncio.AbstractEventLoop
    sampler: Sampler = field(init=False)
    output: list[int] = field(default_factory=list)
    cancelled: bool = False
    id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.request.params)

    @property
    def tenant(self) -> str:
        return self.request.tenant

    def free(self) -> None:
        self.state = None

    def emit(self, event: TokenEvent) -> None:
        """Hands an event to the asyncio side (the engine runs in its own thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)
