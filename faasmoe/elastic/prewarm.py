"""Prewarm: when a request is admitted, wake every function it will need at once, through the gateway's scale API.

Without it a function at zero replicas is found cold only when the forward pass reaches its layer, so a
request after an idle gap pays one cold start per MoE layer, one after another. Woken together at
admission, the cold starts overlap: on a cluster the request pays about one. During a step, the next-layer
lookahead (lookahead.py) wakes what it guesses the next layer will invoke through ``Prewarmer.wake``.

A prewarm is fire and forget on the control plane's one gateway loop: the caller only schedules it, a step
never waits for it, and a wrong prediction or a gateway error costs memory-time or a log line, never a
request. It never lowers a function's replicas (``GatewayClient.scale_from_zero``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import Protocol

from faasmoe.dispatch.remote import GatewayConnection, Invocation
from faasmoe.gateway.client import FunctionNotFound, GatewayClient
from faasmoe.gateway.durations import DurationError, parse_positive_duration
from faasmoe.gateway.schemas import LABEL_SCALE_ZERO_DURATION

log = logging.getLogger(__name__)

# Per function name of the plan: the probability that a step processing `tokens` new tokens of `tenant`
# invokes it (what PopularityPredictor.wake_probabilities gives).
WakeProbabilities = Callable[[str, int], Mapping[str, float]]

# A function invoked less than this share of its keep-alive ago is believed warm, and not even asked about.
# The gateway measures idleness on its own clock and reaps on its own interval: believing a function warm
# that is not costs the cold start prewarming is for, believing it cold costs one status read.
WARM_BELIEF_SHARE = 0.5
# A function a wake found up (or just scaled) is not asked about again for this long, invoked or not: the
# lookahead guesses every decode step, and one wrong guess should not read a function's status every step.
REWAKE_AFTER_S = 1.0
LOG_INTERVAL_S = 60.0  # at most one warning per this long, however many prewarms fail


class PrewarmMode(str, enum.Enum):
    OFF = "off"  # no scale calls: functions wake when the forward pass invokes them
    ALL = "all"  # every function of the plan, for every request
    PREDICTED = "predicted"  # those the popularity predictor expects the request to invoke


class WakeOutcome(str, enum.Enum):
    SCALED = "scaled"  # it had no replicas: the gateway accepted one
    ALREADY_UP = "already_up"  # it had replicas (ready or starting): nothing asked
    NOT_FOUND = "not_found"  # the gateway has no function of that name
    FAILED = "failed"  # any other gateway error


class PrewarmObserver(Protocol):
    """Where prewarm outcomes are counted (the control plane's metrics)."""

    def observe_wake(self, function: str, outcome: WakeOutcome) -> None: ...

    def observe_prediction_failure(self) -> None: ...


def every_function(names: Iterable[str]) -> WakeProbabilities:
    """``--prewarm all``: every function, with probability 1, whatever the request."""
    certain = dict.fromkeys(names, 1.0)
    return lambda tenant, tokens: certain


def keep_alive_s(labels: Mapping[str, str]) -> float:
    """How long the gateway keeps a function after its last use, from its labels; 0 where they do not say."""
    try:
        return parse_positive_duration(labels[LABEL_SCALE_ZERO_DURATION])
    except (KeyError, DurationError):
        return 0.0


class Prewarmer:
    """Wakes the functions ``predict`` gives at least ``threshold``, at most ``max_concurrent`` at once.

    Its state lives on the gateway connection's loop (one thread, no locks): the wakes in flight (a
    function already being woken is not woken again) and, per function, its last invocation, when a wake
    last found it up, and its keep-alive as its labels last said. ``wake`` also reads it from the trunk's
    thread, never writes it there: a stale read costs one more check on the loop.
    """

    def __init__(
        self,
        gateway: GatewayConnection,
        predict: WakeProbabilities,
        threshold: float,
        max_concurrent: int,
        observer: PrewarmObserver | None = None,
    ) -> None:
        self.gateway = gateway
        self.predict = predict
        self.threshold = threshold
        self.observer = observer
        self._slots = asyncio.Semaphore(max_concurrent)
        self._waking: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # held so that a running wake is not collected
        self._invoked_at: dict[str, float] = {}
        self._found_up_at: dict[str, float] = {}
        self._keep_alive_s: dict[str, float] = {}
        self._warnings = RateLimitedWarning(log, LOG_INTERVAL_S)

    def prewarm(self, tenant: str, tokens: int) -> None:
        """Wakes what a request of ``tokens`` new tokens of ``tenant`` will need; returns at once, from any thread."""
        scheduled = self.gateway.submit(lambda client: self._prewarm(client, tenant, tokens))
        scheduled.add_done_callback(self._prediction_done)

    def wake(self, functions: Iterable[str]) -> None:
        """Wakes ``functions`` (the lookahead's guess for the next layer); returns at once, from any thread.

        Those believed warm, being woken or just found up are skipped here, before anything is scheduled:
        in most decode steps that is all of them, and the step pays a few dictionary reads.
        """
        now = time.monotonic()
        cold = [function for function in functions if self._needs_wake(function, now)]
        if cold:
            self.gateway.submit(lambda client: self._wake_all(client, cold))

    def observe_invocation(self, invocation: Invocation) -> None:
        """An InvocationLog observer (on the connection's loop): a function just used is warm."""
        self._invoked_at[invocation.function] = time.monotonic()

    def forget_warm(self, function: str) -> None:
        """The function was scaled to zero (by the idler, on this loop): no longer believed warm."""
        self._invoked_at.pop(function, None)
        self._found_up_at.pop(function, None)

    def _believed_warm(self, function: str, now: float) -> bool:
        invoked_at = self._invoked_at.get(function)
        keep_alive = self._keep_alive_s.get(function, 0.0)
        return invoked_at is not None and now - invoked_at < WARM_BELIEF_SHARE * keep_alive

    def _needs_wake(self, function: str, now: float) -> bool:
        if function in self._waking or self._believed_warm(function, now):
            return False
        return now - self._found_up_at.get(function, -math.inf) >= REWAKE_AFTER_S

    async def _prewarm(self, client: GatewayClient, tenant: str, tokens: int) -> None:
        # A predictor computes: off this loop, so that the steps' invocations on it do not wait.
        probabilities = await asyncio.to_thread(self.predict, tenant, tokens)
        await self._wake_all(client, [function for function, p in probabilities.items() if p >= self.threshold])

    async def _wake_all(self, client: GatewayClient, functions: Iterable[str]) -> None:
        """Starts a wake of each function that needs one (checked again here, on the loop that owns the state)."""
        now = time.monotonic()
        for function in functions:
            if not self._needs_wake(function, now):
                continue
            self._waking.add(function)
            task = asyncio.create_task(self._wake(client, function))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _wake(self, client: GatewayClient, function: str) -> None:
        try:
            async with self._slots:
                status, scaled = await client.scale_from_zero(function)
        except FunctionNotFound as exc:
            outcome = WakeOutcome.NOT_FOUND
            self._warnings.warn("prewarming function %r: %s", function, exc)
        except Exception as exc:  # a prewarm is only an optimisation: whatever failed, the request goes on
            outcome = WakeOutcome.FAILED
            self._warnings.warn("prewarming function %r failed: %s", function, exc)
        else:
            outcome = WakeOutcome.SCALED if scaled else WakeOutcome.ALREADY_UP
            self._keep_alive_s[function] = keep_alive_s(status.labels)
            self._found_up_at[function] = time.monotonic()
        finally:
            self._waking.discard(function)
        if self.observer is not None:
            self.observer.observe_wake(function, outcome)

    def _prediction_done(self, scheduled: Future[None]) -> None:
        if scheduled.cancelled() or scheduled.exception() is None:
            return
        self._warnings.warn("predicting which functions to prewarm failed: %r", scheduled.exception())
        if self.observer is not None:
            self.observer.observe_prediction_failure()


class RateLimitedWarning:
    """Logs a warning at most once per ``interval_s``, saying how many were left out meanwhile."""

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last = -math.inf
        self._left_out = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._left_out += 1
            return
        if self._left_out:
            message += f" ({self._left_out} more such warnings in the last {now - self._last:.0f} s)"
        self.logger.warning(message, *args)
        self._last, self._left_out = now, 0
