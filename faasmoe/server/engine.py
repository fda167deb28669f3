"""The engine: one thread that steps every running sequence of every tenant through the split model.

    while work:  batch = scheduler.schedule();  logits = trunk.step(batch);  self.postprocess(batch, logits)

A failure ends only the sequences it concerns: one sequence's sampling or logprobs ends that sequence;
a failed step (a function, the trunk) ends the step's batch. Tenants are told what failed, never the
detail, which goes to the log under each request's id.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import torch

from faasmoe.model.moe_block import FunctionFailed
from faasmoe.model.split_model import SplitModel
from faasmoe.server.scheduler import Scheduler, SchedulerSettings
from faasmoe.server.sequence import Failure, FailureKind, FinishReason, Sequence, TokenEvent

log = logging.getLogger(__name__)

StepObserver = Callable[[list[Sequence], float], None]
StepStarting = Callable[[list[Sequence]], None]  # the batch, in the trunk's token order, before it steps


class Engine:
    def __init__(self, model: SplitModel, settings: SchedulerSettings | None = None, name: str = "shared") -> None:
        self.model = model
        self.scheduler = Scheduler(settings or SchedulerSettings())
        self.name = name
        self.step_observers: list[StepObserver] = []
        self.step_starting: list[StepStarting] = []
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"faasmoe-engine-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join()

    @property
    def active_sequences(self) -> int:
        with self._lock:
            return len(self.scheduler.running) + sum(len(q) for q in self.scheduler.waiting.values())

    def submit(self, seq: Sequence) -> None:
        """Queues seq with a fresh KV cache; call from the asyncio loop that will consume its events."""
        seq.state = self.model.trunk.new_sequence(seq.prompt_ids)
        seq.loop = asyncio.get_running_loop()
        with self._lock:
            self.scheduler.add(seq)
            self._lock.notify()

    def cancel(self, seq: Sequence) -> None:
        """Ends seq at the next step (a no-op once finished); the engine frees its KV cache."""
        with self._lock:
            seq.cancelled = True
            self._lock.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.scheduler.has_work():
                    self._lock.wait()
                if self._stopping:
                    return
                batch, dropped = self.scheduler.schedule()
            for seq in dropped:
                seq.free()
                seq.emit(TokenEvent(None, finish_reason=FinishReason.CANCELLED))
            if not batch:
                continue
            started = time.perf_counter()
            try:
                for starting in self.step_starting:
                    starting(batch)
                logits = self.model.trunk.step([s.state for s in batch])
            except Exception as exc:  # a dead function or a bug: fail this batch, keep serving
                failure = _step_failure(exc)
                ids = ", ".join(s.request_id for s in batch)
                if failure.kind is FailureKind.ENGINE:
                    log.exception("engine step failed for requests %s", ids)
                else:  # the function tier's own message says it all: no traceback per failed step
                    log.error("engine step failed for requests %s: %s", ids, exc)
                for seq in batch:
                    self._finish(seq, TokenEvent(None, finish_reason=FinishReason.ERROR, failure=failure))
                continue
            for seq, row in zip(batch, logits, strict=True):
                self._advance(seq, row)
            seconds = time.perf_counter() - started
            for observer in self.step_observers:
                try:
                    observer(batch, seconds)
                except Exception:  # metrics and statistics: their failure must not end the engine
                    log.exception("step observer %r failed", observer)

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Samples seq's next token and emits it; a failure here ends seq alone."""
        try:
            token = seq.sampler(logits)
            reason = seq.params.finish(token, len(seq.output) + 1)
            finish = FinishReason(reason) if reason else None
            event = _token_event(token, logits, seq.logprobs, finish)
        except Exception:
            log.exception("request %s: choosing its next token failed", seq.request_id)
            failure = Failure(FailureKind.SEQUENCE)
            self._finish(seq, TokenEvent(None, finish_reason=FinishReason.ERROR, failure=failure))
            return
        seq.output.append(token)
        if finish is None:
            seq.emit(event)
            seq.state.new_tokens = [token]
        else:
            self._finish(seq, event)

    def _finish(self, seq: Sequence, last: TokenEvent) -> None:
        with self._lock:
            self.scheduler.finish(seq)
        seq.free()
        seq.emit(last)


def _step_failure(exc: Exception) -> Failure:
    if isinstance(exc, FunctionFailed):
        return Failure(FailureKind.FUNCTION_UNAVAILABLE if exc.unavailable else FailureKind.FUNCTION, exc.function)
    return Failure(FailureKind.ENGINE)


def _token_event(token: int, logits: torch.Tensor, logprobs: int | None, finish: FinishReason | None) -> TokenEvent:
    if logprobs is None:
        return TokenEvent(token, finish_reason=finish)
    scores = torch.log_softmax(logits.float(), dim=-1)
    top = None
    if logprobs > 0:
        values, ids = torch.topk(scores, logprobs)
        top = dict(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenEvent(token, float(scores[token]), top, finish)
