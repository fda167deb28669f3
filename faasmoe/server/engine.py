"""The engine: one thread that steps every running sequence of every tenant through the split model.

    while work:  batch = scheduler.schedule();  logits = trunk.step(batch);  self.postprocess(batch, logits)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

import torch

from faasmoe.model.split_model import SplitModel
from faasmoe.server.scheduler import Scheduler, SchedulerSettings
from faasmoe.server.sequence import FinishReason, GenerationRequest, Sequence, TokenEvent

log = logging.getLogger(__name__)

StepObserver = Callable[[list[Sequence], float], None]


class RequestHandle:
    """The asyncio side of one request: iterate its events, or cancel it."""

    def __init__(self, seq: Sequence, wake: Callable[[], None]) -> None:
        self.seq = seq
        self._wake = wake

    async def events(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self.seq.events.get()
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self) -> None:
        self.seq.cancelled = True
        self._wake()


class Engine:
    def __init__(self, model: SplitModel, settings: SchedulerSettings | None = None, name: str = "shared") -> None:
        self.model = model
        self.scheduler = Scheduler(settings or SchedulerSettings())
        self.name = name
        self.step_observers: list[StepObserver] = []
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

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queues a request; call from the asyncio loop that will consume its events."""
        seq = Sequence(
            request=request,
            state=self.model.trunk.new_sequence(request.prompt_ids),
            events=asyncio.Queue(),
            loop=asyncio.get_running_loop(),
        )
        with self._lock:
            self.scheduler.add(seq)
            self._lock.notify()
        return RequestHandle(seq, self._wake)

    def _wake(self) -> None:
        with self._lock:
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
            try:
                started = time.perf_counter()
                logits = self.model.trunk.step([s.state for s in batch])
                self._postprocess(batch, logits)
                for observer in self.step_observers:
                    observer(batch, time.perf_counter() - started)
            except Exception as exc:  # a dead function or a bug: fail this batch, keep serving
                log.exception("engine step failed")
                with self._lock:
                    for seq in batch:
                        self.scheduler.finish(seq)
                        seq.free()
                        seq.emit(TokenEvent(None, finish_reason=FinishReason.ERROR, error=str(exc)))

    def _postprocess(self, batch: list[Sequence], logits: list[torch.Tensor]) -> None:
        for seq, row in zip(batch, logits, strict=True):
            token = seq.sampler(row)
            seq.output.append(token)
            params = seq.request.params
            finish = None
            if token in params.stop_token_ids:
                finish = FinishReason.STOP
            elif len(seq.output) >= params.max_new_tokens:
                finish = FinishReason.LENGTH
            seq.emit(_token_event(token, row, seq.request.logprobs, finish))
            if finish is None:
                seq.state.new_tokens = [token]
            else:
                with self._lock:
                    self.scheduler.finish(seq)
                seq.free()


def _token_event(token: int, logits: torch.Tensor, logprobs: int | None, finish: FinishReason | None) -> TokenEvent:
    if logprobs is None:
        return TokenEvent(token, finish_reason=finish)
    scores = torch.log_softmax(logits.float(), dim=-1)
    top = None
    if logprobs > 0:
        values, ids = torch.topk(scores, logprobs)
        top = dict(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenEvent(token, float(scores[token]), top, finish)
