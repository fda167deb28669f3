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

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

from faasmoe.server.engine import Engine
from faasmoe.server.metrics import Metrics
from faasmoe.server.protocol import ChatCompletionRequest, CompletionRequest, now
from faasmoe.server.sequence import Failure, FailureKind, FinishReason, Sequence, TokenEvent
from faasmoe.server.tenants import Charge, Tenant

log = logging.getLogger(__name__)


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
    """Incremental detokenization with stop strings: linear in the sequence's length.

    `tokenizers`' DecodeStream decodes a small window of recent ids at each step and yields text only
    once it ends in a whole character, so no piece ends in part of a multi-byte character. Of that
    text, the last (longest stop string - 1) characters are held back: they may still begin a stop
    string that the next tokens complete.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> None:
        self._tokenizer = tokenizer.backend_tokenizer
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []  # for flush(): the tail DecodeStream is still waiting on
        self._decoded = 0  # characters DecodeStream has yielded
        self._held = ""  # decoded but not handed out: it may be the start of a stop string
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.stop = stop
        self.stopped = False

    def add(self, token_id: int) -> str:
        """New final text after token_id; sets `stopped` (and cuts the text) at a stop string."""
        self._ids.append(token_id)
        chunk = self._decoder.step(self._tokenizer, token_id)  # None while a character is incomplete
        return self._release(chunk or "", end=False)

    def flush(self) -> str:
        """The rest at the end of the sequence: held-back text and any incomplete character (as U+FFFD)."""
        rest = self._tokenizer.decode(self._ids, skip_special_tokens=True)[self._decoded :]
        return self._release(rest, end=True)

    def _release(self, chunk: str, end: bool) -> str:
        # A stop string cannot start in text already handed out: it would have ended within what was
        # decoded one step earlier, and been found then. So searching the held text and the chunk suffices.
        self._decoded += len(chunk)
        text = self._held + chunk
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = 0 if end else min(self._hold, len(text))
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]


@dataclass
class Generation:
    """One admitted request as the API sees it: its sequence on an engine, its quota charge, its response's
    identity. ``start()``, then iterate ``deltas()`` once.

    It owns the charge from its creation: whoever creates one must see that ``close()`` is called.
    """

    body: CompletionRequest | ChatCompletionRequest
    seq: Sequence
    engine: Engine
    tenant: Tenant
    charge: Charge
    metrics: Metrics
    model: str
    id: str  # the response object's ("cmpl-..." or "chatcmpl-...")
    created: int = field(default_factory=now)
    arrived: float = field(default_factory=time.perf_counter)
    completion_tokens: int = 0
    _started: bool = False
    _closed: bool = False

    def start(self) -> None:
        """Queues the sequence on the engine."""
        self.engine.submit(self.seq)
        self._started = True

    async def deltas(self) -> AsyncIterator[Delta]:
        assert self._started, "start() first"
        tenant = self.tenant.name
        text = TextStream(self.engine.model.tokenizer, self.body.stop_strings)
        last = self.arrived
        try:
            async for event in self.seq.stream():
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
            log.exception("request %s: detokenizing failed", self.seq.request_id)
            raise GenerationFailed(Failure(FailureKind.SEQUENCE)) from None

    def close(self) -> None:
        """Idempotent: stops generating and returns the quota's unused reservation.

        Also called after a streamed response ends, in case the stream never started (client gone at once).
        """
        if self._closed:
            return
        self._closed = True
        if self._started:
            self.engine.cancel(self.seq)  # the engine frees the KV cache at its next step (a no-op once finished)
        tenant, prompt = self.tenant.name, len(self.seq.prompt_ids)
        self.metrics.tokens.labels(tenant, "prompt").inc(prompt)
        self.metrics.tokens.labels(tenant, "completion").inc(self.completion_tokens)
        self.tenant.release(self.charge, prompt + self.completion_tokens)
