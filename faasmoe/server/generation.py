"""One request's generation as the API sees it: engine events -> text deltas, stop strings, metrics.

The engine speaks token ids; this turns them into text incrementally (holding back text that may
still become a stop string or an incomplete UTF-8 character), ends the request at a stop string,
and always releases the request's KV cache and quota, also when the client goes away.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from faasmoe.server.engine import Engine, RequestHandle
from faasmoe.server.metrics import Metrics
from faasmoe.server.sequence import Failure, FailureKind, FinishReason, GenerationRequest, TokenEvent
from faasmoe.server.tenants import Admission

log = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for a partial multi-byte character


class GenerationFailed(Exception):
    """The request could not be finished (e.g. an expert function failed); `failure` says what failed."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.kind.value)
        self.failure = failure


@dataclass(frozen=True)
class Delta:
    """What one step adds to a response: text, the tokens behind it, and maybe the end."""

    text: str
    tokens: list[TokenEvent]
    finish_reason: str | None = None


class TextStream:
    """Incremental detokenization with stop strings."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False
        self._hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int) -> str:
        """New final text after token_id; sets `stopped` (and cuts the text) at a stop string."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = min(
            (i for i in (text.find(s, max(self.emitted - self._hold, 0)) for s in self.stop) if i >= 0), default=-1
        )
        if cut >= 0:
            self.stopped = True
            return self._take(text, cut)
        end = len(text) - self._hold
        if text.endswith(REPLACEMENT_CHAR):
            end = min(end, len(text) - 1)
        return self._take(text, end)

    def flush(self) -> str:
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted : end], end
        return piece


@dataclass
class Generation:
    """Runs one admitted request on an engine: `start()`, then iterate `deltas()` once.

    It owns the admission from its creation: whoever creates one must see that `close()` is called.
    """

    engine: Engine
    request: GenerationRequest
    stop: list[str]
    admission: Admission
    metrics: Metrics
    arrived: float = field(default_factory=time.perf_counter)
    completion_tokens: int = 0
    _handle: RequestHandle | None = None
    _closed: bool = False

    def start(self) -> None:
        """Queues the request on the engine."""
        self._handle = self.engine.submit(self.request)

    async def deltas(self) -> AsyncIterator[Delta]:
        assert self._handle is not None, "start() first"
        tenant = self.request.tenant
        text = TextStream(self.engine.model.tokenizer, self.stop)
        last = self.arrived
        try:
            async for event in self._handle.events():
                if event.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):  # cancelled: the client left
                    raise GenerationFailed(event.failure or Failure(FailureKind.ENGINE))
                now = time.perf_counter()
                (self.metrics.tpot if self.completion_tokens else self.metrics.ttft).labels(tenant).observe(now - last)
                last = now
                self.completion_tokens += 1
                finish = event.finish_reason.value if event.finish_reason else None
                piece = self._detokenize(text, event.token_id, flush=finish is not None)
                if text.stopped:
                    yield Delta(piece, [event], FinishReason.STOP.value)
                    return
                yield Delta(piece, [event], finish)
        finally:
            self.close()

    def _detokenize(self, text: TextStream, token_id: int, flush: bool) -> str:
        """The text token_id adds; a failure here fails this request alone."""
        try:
            piece = text.add(token_id)
            return piece + text.flush() if flush and not text.stopped else piece
        except Exception:
            log.exception("request %s: detokenizing failed", self.request.request_id)
            raise GenerationFailed(Failure(FailureKind.SEQUENCE)) from None

    def close(self) -> None:
        """Idempotent: stops generating (a no-op once finished) and returns the quota's unused reservation.

        Also called after a streamed response ends, in case the stream never started (client gone at once).
        """
        if self._handle is not None:
            self._handle.cancel()  # the engine frees the KV cache at its next step
            self._handle = None
        if not self._closed:
            self._closed = True
            tenant, prompt = self.request.tenant, len(self.request.prompt_ids)
            self.metrics.tokens.labels(tenant, "prompt").inc(prompt)
            self.metrics.tokens.labels(tenant, "completion").inc(self.completion_tokens)
            self.admission.release(prompt + self.completion_tokens)
