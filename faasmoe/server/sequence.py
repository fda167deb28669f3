"""A request as the engine sees it (a Sequence), and the events it streams back."""

from __future__ import annotations

import asyncio
import enum
import itertools
import uuid
from collections.abc import AsyncIterator
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
    """One request on the engine: what it asks for, then its KV cache, sampler, output and events.

    The API side makes it; ``Engine.submit`` gives it its KV cache and the loop its events go to, and
    ``Engine.cancel`` ends it. The finish rule is its ``params.finish`` (shared with ``model/generate.py``).
    """

    tenant: str
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None  # how many top alternatives to return per token (0: only the chosen one)
    request_id: str = field(default_factory=new_request_id)  # names the request in the log and in its errors
    state: SequenceState | None = field(default=None, init=False)  # set by submit; None again once finished
    events: asyncio.Queue[TokenEvent] = field(default_factory=asyncio.Queue, init=False)
    loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)
    sampler: Sampler = field(init=False)
    output: list[int] = field(default_factory=list, init=False)
    cancelled: bool = field(default=False, init=False)
    id: int = field(default_factory=lambda: next(_ids), init=False)

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)

    def free(self) -> None:
        self.state = None

    def emit(self, event: TokenEvent) -> None:
        """Hands an event to the asyncio side (the engine runs in its own thread)."""
        assert self.loop is not None, "Engine.submit first"
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def stream(self) -> AsyncIterator[TokenEvent]:
        """The sequence's events up to and including the last (the one with a finish reason)."""
        while True:
            event = await self.events.get()
            yield event
            if event.finish_reason is not None:
                return
