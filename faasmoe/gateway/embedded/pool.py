"""The replicas of one function: scale from zero, spreading requests, scaling, idling to zero."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone

from faasmoe.errors import FaasmoeError
from faasmoe.gateway.embedded.errors import ReplicaLost, ReplicaUnavailable
from faasmoe.gateway.embedded.policy import ScalePolicy
from faasmoe.gateway.embedded.replicas import Replica, ReplicaLauncher, ReplicaState
from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings
from faasmoe.gateway.schemas import FunctionDeployment

logger = logging.getLogger(__name__)

_LIVE = (ReplicaState.STARTING, ReplicaState.READY)
# Starts one request may wait through when a replica is killed from outside while starting.
_LOST_RESTARTS = 1


class FunctionPool:
    """Keeps ``desired`` replicas of one deployed function and hands them out to requests.

    ``desired`` is what the status calls ``replicas``; ready replicas are ``availableReplicas``.
    A replica that died after it was ready is forgotten and replaced on the next request. A replica that
    failed to start (its shard did not load, it crashed or timed out) is final: that failure answers the
    requests waiting for it, and every request for ``start_failure_cooldown_s`` after (or until the function
    is updated) without starting another, so a broken function costs no restart loop. Only a replica
    killed from outside while starting (a signal, its zygote's death) is started again for the same request.
    """

    def __init__(
        self,
        deployment: FunctionDeployment,
        policy: ScalePolicy,
        launcher: ReplicaLauncher,
        settings: EmbeddedGatewaySettings,
    ) -> None:
        self.deployment = deployment
        self.policy = policy
        self.created_at = datetime.now(timezone.utc)
        self.desired = policy.min_replicas
        self.invocation_count = 0
        self.in_flight = 0
        self.last_used = time.monotonic()
        self._launcher = launcher
        self._stop_grace_s = settings.stop_grace_s
        self._cold_start_timeout_s = settings.cold_start_timeout_s
        self._failure_cooldown_s = settings.start_failure_cooldown_s
        self._failure: FaasmoeError | None = None  # the last start failure, final until it cools down
        self._failed_at = 0.0
        self._replicas: list[Replica] = []
        self._turn = itertools.count()
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def name(self) -> str:
        return self.deployment.service

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas)

    def ready_count(self) -> int:
        return sum(r.state is ReplicaState.READY for r in self._replicas)

    # --- requests ---------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Replica]:
        """A ready replica for one request, counted in flight (and not idle) while held."""
        self.in_flight += 1
        self.last_used = time.monotonic()
        try:
            replica = await self._acquire()
            replica.in_flight += 1
            try:
                yield replica
            finally:
                replica.in_flight -= 1
        finally:
            self.in_flight -= 1
            self.last_used = time.monotonic()

    async def _acquire(self) -> Replica:
        """A ready replica, starting one (and holding the caller until it is ready) if none is."""
        deadline = time.monotonic() + self._cold_start_timeout_s
        lost = 0
        while True:
            if self._closed:
                raise ReplicaUnavailable(f"function {self.name!r} was deleted while the request waited")
            self.forget_exited()
            ready = [r for r in self._replicas if r.state is ReplicaState.READY]
            if ready:
                self.reconcile()  # replaces replicas that died, in the background
                return self._least_loaded(ready)
            if (failure := self.recent_failure()) is not None:
                raise _again(failure)
            # Scale from zero; callers arriving meanwhile wait for the same starting replica.
            self.desired = max(self.desired, self.policy.clamp(1))
            self.reconcile()
            starting = [r.startup for r in self._replicas if r.startup and not r.startup.done()]
            remaining = deadline - time.monotonic()
            if not starting or remaining <= 0:
                raise ReplicaUnavailable(
                    f"function {self.name!r}: no replica ready within {self._cold_start_timeout_s:g} s"
                )
            done, _ = await asyncio.wait(starting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = None if task.cancelled() else task.exception()
                if error is None or self.ready_count():
                    continue
                if isinstance(error, ReplicaLost) and lost < _LOST_RESTARTS:
                    lost += 1  # killed from outside: the next round starts another
                    continue
                raise _again(error)

    def recent_failure(self) -> FaasmoeError | None:
        """The last start failure while it is final (within the cooldown), else None."""
        if self._failure is not None and time.monotonic() - self._failed_at >= self._failure_cooldown_s:
            self._failure = None
        return self._failure

    def _least_loaded(self, ready: list[Replica]) -> Replica:
        # Rotating the start makes ties (the common case) go round robin.
        start = next(self._turn) % len(ready)
        rotated = ready[start:] + ready[:start]
        return min(rotated, key=lambda r: r.in_flight)

    def report_unreachable(self, replica: Replica) -> None:
        """The replica refused a connection: drop it so the next lease starts a fresh one."""
        if replica in self._replicas:
            logger.warning("function %s: replica pid %s unreachable; replacing it", self.name, replica.pid)
            self._stop(replica)

    # --- scaling ----------------------------------------------------------------------------

    def scale(self, replicas: int) -> int:
        """Set the desired replica count (clamped to the policy); returns the count applied."""
        self.desired = self.policy.clamp(replicas)
        # Replicas asked for now are not "idle since the last request" yet.
        self.last_used = time.monotonic()
        self.reconcile()
        return self.desired

    def forget_exited(self) -> None:
        for replica in [r for r in self._replicas if r.state is not ReplicaState.STARTING]:
            if replica.has_exited():
                logger.warning(
                    "function %s: replica pid %s exited with code %s; log %s",
                    self.name,
                    replica.pid,
                    replica.process.returncode if replica.process else None,
                    replica.log_path,
                )
                replica.state = ReplicaState.EXITED
                self._replicas.remove(replica)

    def reconcile(self) -> None:
        """Start or stop replicas until the live ones match ``desired``."""
        live = [r for r in self._replicas if r.state in _LIVE]
        if self.recent_failure() is None:  # a function that just failed to start is not restarted in a loop
            for _ in range(self.desired - len(live)):
                self._start_replica()
        surplus = len(live) - self.desired
        if surplus > 0:
            # Stop starting replicas first, then the least busy ready ones.
            order = sorted(live, key=lambda r: (r.state is ReplicaState.READY, r.in_flight))
            for replica in order[:surplus]:
                self._stop(replica)

    def idle_for(self, now: float) -> float:
        return 0.0 if self.in_flight else now - self.last_used

    def scale_down_if_idle(self, now: float) -> bool:
        """Scale to the minimum when idle past the idle timeout; True if replicas were stopped."""
        if not self.policy.scale_to_zero or self.desired <= self.policy.min_replicas:
            return False
        if self.idle_for(now) < self.policy.idle_timeout_s:
            return False
        logger.info(
            "function %s: idle for %.1f s; scaling to %d", self.name, self.idle_for(now), self.policy.min_replicas
        )
        self.scale(self.policy.min_replicas)
        return True

    async def redeploy(self, deployment: FunctionDeployment, policy: ScalePolicy) -> None:
        """Replace the deployment: old replicas stop, new ones start with the new environment."""
        old = list(self._replicas)
        # Switch first, so a request arriving meanwhile starts a replica of the new deployment.
        self.deployment = deployment
        self.policy = policy
        self._failure = None  # the new deployment may well start
        self.desired = policy.clamp(self.desired)
        for replica in old:
            self._stop(replica)
        # Old processes go before new ones start, so two sets of (possibly large) weights do
        # not coexist.
        await self._drain_background()
        self.reconcile()

    async def close(self) -> None:
        """Stop every replica and wait until their processes are gone."""
        self._closed = True
        self.desired = 0
        for replica in list(self._replicas):
            self._stop(replica)
        await self._drain_background()

    # --- internals --------------------------------------------------------------------------

    def _start_replica(self) -> None:
        replica = self._launcher.create(self.deployment)
        self._replicas.append(replica)
        replica.startup = asyncio.create_task(self._bring_up(replica, self.deployment, self.policy))
        replica.startup.add_done_callback(self._log_failed_start)

    async def _bring_up(self, replica: Replica, deployment: FunctionDeployment, policy: ScalePolicy) -> None:
        try:
            await self._launcher.start(replica, deployment, policy.ready_path)
        except ReplicaLost:
            self._forget(replica)
            raise
        except FaasmoeError as exc:
            self._forget(replica)
            self._remember(exc, deployment)
            raise
        except Exception as exc:  # a bug, not the function's doing: still one failure, said plainly
            self._forget(replica)
            logger.exception("function %s: starting a replica failed", self.name)
            failure = ReplicaUnavailable(f"function {self.name!r}: the gateway could not start a replica")
            self._remember(failure, deployment)
            raise failure from exc
        except BaseException:  # cancelled: scaled down or deleted
            self._forget(replica)
            raise

    def _forget(self, replica: Replica) -> None:
        if replica in self._replicas:
            self._replicas.remove(replica)

    def _remember(self, failure: FaasmoeError, deployment: FunctionDeployment) -> None:
        if deployment is self.deployment:  # a failure of the deployment an update replaced says nothing now
            self._failure = failure
            self._failed_at = time.monotonic()

    def _log_failed_start(self, task: asyncio.Task[None]) -> None:
        # Retrieving the exception here also keeps asyncio from warning it was never retrieved.
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s", task.exception())

    def _stop(self, replica: Replica) -> None:
        self._forget(replica)
        if replica.startup is not None and not replica.startup.done():
            replica.startup.cancel()  # its cleanup stops the process
            task = replica.startup
        else:
            task = asyncio.create_task(replica.stop(self._stop_grace_s))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain_background(self) -> None:
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _again(failure: FaasmoeError) -> FaasmoeError:
    """A fresh exception saying what ``failure`` said, for one more request (tracebacks are not shared)."""
    return type(failure)(str(failure))
