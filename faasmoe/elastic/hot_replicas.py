"""Hot-function replicas: a function whose calls queue gets more replicas through the gateway's scale API, up to
its ``com.openfaas.scale.max`` label, and gives them back once the queueing has stayed low for a while.

**The signal.** Each invocation's queueing delay as its replica reports it (``QUEUE_HEADER``): the seconds the
call waited, weights loaded, for the compute thread that earlier calls held. That wait is exactly what another
replica takes away. The round trip minus compute was not used: it also holds the transport, the gateway's hop,
encoding and the control plane's own loop, which no replica removes and which swing by milliseconds on a busy
machine, so it would scale out for the wrong reason. A function that sends no queue header (not faasmoe's
function server) gives no signal and is never scaled here. Not seen: calls that of-watchdog refuses beyond its
``max_inflight`` (429), whose retries the gateway client waits out before they reach a replica.

**The policy** (``decide``, pure; docs/elasticity.md, "Hot-function replicas"): per function, the mean queueing
delay of its invocations over the last ``window_s`` seconds, once ``min_samples`` of them are in it:

- above the target: one replica more, once all it has are ready, up to the label's maximum (``DEFAULT_SCALE_MAX``,
  OpenFaaS's own default, where it has none); the window then starts again, so the next step is judged on
  the queueing with the new replica serving;
- below ``low_share`` of the target, or too few calls to say, for ``scale_in_delay_s``: one replica fewer,
  and the delay starts again;
- in between: nothing (the hysteresis band).

**Living with the others that set replicas.** Only replicas this scaler added are taken back, and never the
last one: a function at 0 is the idler's (and the gateway's zero-duration), and the next call wakes it; one
at 1 is left to them. A count that someone else changed since this scaler set it (an operator, the gateway's
own scale from zero or to zero, the idler) is theirs: the scaler disowns its additions and lowers nothing of
it. It never scales out a function at 0 (idle: the prewarmer and the gateway wake it) nor one whose replicas
are still starting. When the idler scales a function to zero it tells the scaler (``forget``).

**What dispatch learns.** ``ReadyReplicas``: per function, its ready replicas as the scaler last read them
(``GET /system/functions``), over which dispatch splits each call by experts. It reads the gateway
only when a decision may be due or a function it knows to be replicated may have changed, so an idle
platform, or one whose functions do not queue, makes no calls for it.

Its state lives on the gateway connection's loop, as the invocations that feed it do (one thread, no locks);
``ReadyReplicas`` is read from the trunk's thread (one dictionary read per call).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from faasmoe.dispatch.remote import Invocation
from faasmoe.elastic.prewarm import LOG_INTERVAL_S, RateLimitedWarning
from faasmoe.gateway.client import FunctionNotFound, GatewayClient, GatewayError
from faasmoe.gateway.schemas import DEFAULT_SCALE_MAX, LABEL_SCALE_MAX, FunctionStatus

log = logging.getLogger(__name__)


def _off_is_zero(value: Any) -> Any:
    return 0.0 if isinstance(value, str) and value.strip().lower() == "off" else value


# Milliseconds; 0 or "off" disables hot replicas.
QueueTarget = Annotated[float, BeforeValidator(_off_is_zero), Field(ge=0)]


class HotReplicaSettings(BaseModel):
    """The scaler's knobs (``FAASMOE_SERVE_HOT_REPLICAS__*``); docs/elasticity.md argues the defaults."""

    model_config = ConfigDict(extra="forbid")

    queue_target_ms: QueueTarget = Field(100.0, description="mean queueing delay above which a replica is added")
    scale_in_delay_s: float = Field(60.0, gt=0, description="low queueing this long takes an added replica back")
    window_s: float = Field(5.0, gt=0, description="the queueing delays averaged")
    min_samples: int = Field(4, ge=1, description="invocations in the window before it says anything")
    low_share: float = Field(0.5, ge=0, lt=1, description="below this share of the target the queueing is low")
    check_interval_s: float = Field(1.0, gt=0, description="how often the scaler decides")

    @property
    def enabled(self) -> bool:
        return self.queue_target_ms > 0

    @property
    def target_s(self) -> float:
        return self.queue_target_ms / 1000


@dataclass(frozen=True)
class Replicas:
    """A function's replicas as the gateway last told: desired (``replicas``), ready, and its label's maximum."""

    desired: int
    ready: int
    max: int


def decide(
    mean_queue_s: float | None, quiet_s: float, replicas: Replicas, added: int, settings: HotReplicaSettings
) -> int | None:
    """The replica count to ask for, or None to leave it.

    ``mean_queue_s``: the window's mean (None: too few calls); ``quiet_s``: how long it has been low;
    ``added``: the replicas this scaler added and still owns.
    """
    if replicas.desired == 0:
        return None  # scaled to zero, idle: the keep-alive's, and the next call wakes it
    if mean_queue_s is not None and mean_queue_s > settings.target_s:
        starting = replicas.ready < replicas.desired  # judged once they serve
        return None if starting or replicas.desired >= replicas.max else replicas.desired + 1
    if added > 0 and replicas.desired > 1 and quiet_s >= settings.scale_in_delay_s:
        return replicas.desired - 1
    return None


def max_replicas(labels: dict[str, str]) -> int | None:
    """``com.openfaas.scale.max``, ``DEFAULT_SCALE_MAX`` where absent; None where it is not a whole number >= 1."""
    try:
        value = int(labels.get(LABEL_SCALE_MAX, DEFAULT_SCALE_MAX))
    except ValueError:
        return None
    return value if value >= 1 else None


@dataclass
class QueueWindow:
    """One function's recent queueing delays, and since when they have been low."""

    settings: HotReplicaSettings
    samples: deque[tuple[float, float]] = field(default_factory=deque)  # (observed at, queue seconds)
    quiet_since: float | None = None

    def observe(self, at: float, queue_s: float) -> None:
        self.samples.append((at, queue_s))

    def tick(self, now: float) -> float | None:
        """The mean over the window now (None: too few calls); notes since when it has been low."""
        while self.samples and self.samples[0][0] < now - self.settings.window_s:
            self.samples.popleft()
        mean = statistics.fmean(s for _, s in self.samples) if len(self.samples) >= self.settings.min_samples else None
        if mean is not None and mean >= self.settings.low_share * self.settings.target_s:
            self.quiet_since = None
        elif self.quiet_since is None:
            self.quiet_since = now
        return mean

    def quiet_for(self, now: float) -> float:
        return 0.0 if self.quiet_since is None else now - self.quiet_since

    def restart(self) -> None:
        """After this scaler changed the replicas: the next step is judged on new calls, after a new delay."""
        self.samples.clear()
        self.quiet_since = None


class ReadyReplicas:
    """Per function, its ready replicas as the scaler last read them: how many calls dispatch splits a layer's
    call into. A function it has not seen replicated has 1."""

    def __init__(self) -> None:
        self._ready: dict[str, int] = {}

    def __call__(self, function: str) -> int:
        return self._ready.get(function, 1)

    def set(self, function: str, ready: int) -> None:
        if ready > 1:
            self._ready[function] = ready
        else:
            self._ready.pop(function, None)


class ReplicaObserver(Protocol):
    """Where the scaler's calls are counted (the control plane's metrics)."""

    def observe_replica_scale_out(self, function: str) -> None: ...

    def observe_replica_scale_in(self, function: str) -> None: ...


class ReplicaScaler:
    """Adds replicas to ``functions`` (the plan's) whose calls queue, and takes them back; feeds ``ready``."""

    def __init__(
        self,
        functions: Iterable[str],
        settings: HotReplicaSettings,
        ready: ReadyReplicas,
        observer: ReplicaObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.ready = ready
        self.observer = observer
        self.clock = clock
        self._windows = {name: QueueWindow(settings) for name in functions}
        self._known: dict[str, Replicas] = {}  # as last read
        self._added: dict[str, int] = {}  # replicas this scaler added and still owns
        self._asked: dict[str, int] = {}  # the count it last set: any other count is someone else's
        self._warnings = RateLimitedWarning(log, LOG_INTERVAL_S)

    def added(self, function: str) -> int:
        return self._added.get(function, 0)

    def observe_invocation(self, invocation: Invocation) -> None:
        """An InvocationLog observer (on the connection's loop)."""
        window = self._windows.get(invocation.function)
        if window is not None and invocation.queue_seconds is not None:
            window.observe(self.clock(), invocation.queue_seconds)

    def forget(self, function: str) -> None:
        """The function was scaled to zero (by the idler, on this loop): no replicas left to own or split over."""
        self._disown(function)
        self._known.pop(function, None)
        self.ready.set(function, 0)
        if (window := self._windows.get(function)) is not None:
            window.restart()

    async def run(self, client: GatewayClient) -> None:
        """Until cancelled: every ``check_interval_s``, reads what it needs of the gateway and scales."""
        while True:
            await asyncio.sleep(self.settings.check_interval_s)
            try:
                await self.check(client)
            except GatewayError as exc:  # the next pass is the retry; replicas stay as they are meanwhile
                self._warnings.warn("hot replicas: the gateway did not list its functions: %s", exc)

    async def check(self, client: GatewayClient) -> dict[str, int]:
        """One pass: the functions scaled, each with the count asked for."""
        now = self.clock()
        means = {name: window.tick(now) for name, window in self._windows.items()}
        due = [name for name, mean in means.items() if self._may_act(name, mean)]
        if not due:
            return {}
        statuses = {status.name: status for status in await client.list_functions()}
        scaled = {}
        for name in due:
            status = statuses.get(name)
            if status is None:  # deleted: the reconciler, if on, deploys it again
                self.forget(name)
                continue
            replicas, changed = self._learn(name, status)
            window = self._windows[name]
            mean = None if changed else means[name]  # calls measured before a change say nothing of what serves now
            target = decide(mean, window.quiet_for(now), replicas, self.added(name), self.settings)
            if target is not None and await self._scale(client, name, replicas.desired, target):
                window.restart()
                scaled[name] = target
        return scaled

    def _may_act(self, name: str, mean: float | None) -> bool:
        """Whether this function's status is worth a read: it queues, or it has replicas that may change."""
        hot = mean is not None and mean > self.settings.target_s
        return hot or self.added(name) > 0 or self.ready(name) > 1

    def _learn(self, name: str, status: FunctionStatus) -> tuple[Replicas, bool]:
        """The function's replicas as ``status`` gives them, and whether they changed since the last read."""
        limit = max_replicas(status.labels)
        if limit is None:
            label = status.labels.get(LABEL_SCALE_MAX)
            self._warnings.warn("function %r: label %s=%r is not a count; not scaled out", name, LABEL_SCALE_MAX, label)
        replicas = Replicas(status.replicas, status.available_replicas, limit or status.replicas)
        if self._asked.get(name, status.replicas) != status.replicas:
            self._disown(name)  # someone else set the count since: theirs now, not this scaler's to lower
        previous = self._known.get(name)
        changed = previous is not None and (previous.desired, previous.ready) != (replicas.desired, replicas.ready)
        if changed:
            self._windows[name].samples.clear()  # the low-queueing delay goes on: it is about this scaler's steps
        self._known[name] = replicas
        self.ready.set(name, replicas.ready)
        return replicas, changed

    async def _scale(self, client: GatewayClient, name: str, current: int, target: int) -> bool:
        try:
            await client.scale(name, target)
        except FunctionNotFound:
            self.forget(name)
            return False
        except GatewayError as exc:
            self._warnings.warn("hot replicas: scaling function %r to %d failed: %s", name, target, exc)
            return False
        out = target > current
        self._added[name] = self.added(name) + (1 if out else -1)
        self._asked[name] = target
        if not out:  # split over the replicas left from now on, not at the next read
            self.ready.set(name, min(self.ready(name), target))
        log.info("function %s: queueing %s; scaled to %d replicas", name, "high" if out else "low again", target)
        if self.observer is not None:
            (self.observer.observe_replica_scale_out if out else self.observer.observe_replica_scale_in)(name)
        return True

    def _disown(self, name: str) -> None:
        self._added.pop(name, None)
        self._asked.pop(name, None)
