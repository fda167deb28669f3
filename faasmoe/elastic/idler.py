"""The control plane's idler (``--keep-alive adaptive``): scales a function to zero once it has been idle for
its own keep-alive, through the gateway's scale API.

Each function's ``com.openfaas.scale.zero-duration`` label stays as deployed and is the upper bound: the
gateway still scales to zero after it by itself, so a control plane that stops, or a scale call that fails,
leaves today's behaviour. Only functions labelled ``com.openfaas.scale.zero: "true"`` with no minimum replicas
are scaled, as OpenFaaS Pro would. Why scale calls rather than label updates: docs/elasticity.md.

Its state lives on the gateway connection's loop, as the invocations that feed it do (one thread, no locks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol

from faasmoe.dispatch.remote import Invocation
from faasmoe.elastic.keep_alive import IdleHistory, KeepAlive, KeepAliveSettings, break_even_s, choose_keep_alive
from faasmoe.elastic.prewarm import LOG_INTERVAL_S, RateLimitedWarning, keep_alive_s
from faasmoe.gateway.client import FunctionNotFound, GatewayClient, GatewayError
from faasmoe.gateway.schemas import LABEL_SCALE_MIN, LABEL_SCALE_ZERO, FunctionStatus
from faasmoe.planning.plan import Plan

log = logging.getLogger(__name__)


class IdlerObserver(Protocol):
    """Where the idler's choices are shown (the control plane's metrics)."""

    def observe_keep_alive(self, function: str, seconds: float) -> None: ...

    def observe_scale_down(self, function: str) -> None: ...


def may_scale_to_zero(labels: dict[str, str]) -> bool:
    """As OpenFaaS Pro reads the labels: scale to zero only where asked for, and with no minimum above it."""
    return labels.get(LABEL_SCALE_ZERO, "").strip().lower() == "true" and labels.get(LABEL_SCALE_MIN, "0") == "0"


class Idler:
    """Per function of ``plan``: its idle history, its keep-alive, and since when it is idle (until scaled down)."""

    def __init__(
        self,
        plan: Plan,
        fixed_s: float,
        settings: KeepAliveSettings,
        observer: IdlerObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``fixed_s``: the upper bound of a function whose labels name none, or before they are read."""
        self.settings = settings
        self.observer = observer
        self.clock = clock
        self.default_fixed_s = fixed_s
        self.scaled_down: list[Callable[[str], None]] = []  # told each function the idler scaled to zero
        self._bytes = {function.name: function.bytes for function in plan.functions}
        self._plan_bytes = sum(self._bytes.values())
        self._histories = {name: IdleHistory(settings) for name in self._bytes}
        self._fixed_s: dict[str, float] = {}
        self._keep_alive: dict[str, KeepAlive] = {}
        self._idle_since: dict[str, float] = {}  # functions invoked and not scaled down since
        self._warnings = RateLimitedWarning(log, LOG_INTERVAL_S)
        for name in self._bytes:
            self._choose(name)

    def keep_alive(self, function: str) -> KeepAlive:
        return self._keep_alive[function]

    def observe_invocation(self, invocation: Invocation) -> None:
        """An InvocationLog observer (on the connection's loop)."""
        history = self._histories.get(invocation.function)
        if history is None:  # not this plan's
            return
        ended = self.clock()
        if history.observe(ended - invocation.seconds, ended, invocation.cold_start):
            self._choose(invocation.function)
        self._idle_since[invocation.function] = ended

    def expired(self, now: float) -> list[str]:
        """The functions idle for at least their keep-alive, not scaled down since."""
        return [name for name, since in self._idle_since.items() if now - since >= self._keep_alive[name].seconds]

    async def run(self, client: GatewayClient) -> None:
        """Until cancelled: reads the functions' labels, then every ``check_interval_s`` scales expired ones down."""
        await self._guarded(self._read_labels(client))
        while True:
            await asyncio.sleep(self.settings.check_interval_s)
            await self._guarded(self.scale_down_expired(client))

    async def scale_down_expired(self, client: GatewayClient) -> list[str]:
        """Scales to zero the functions whose keep-alive ran out and that run replicas; returns their names.

        One status list per pass with anything expired: it gives each function's labels as they are now (the
        upper bound may have changed) and its replicas (the gateway may have scaled it down already).
        """
        if not self.expired(self.clock()):
            return []
        statuses = await self._read_labels(client)
        scaled = []
        for name in self.expired(self.clock()):  # an invocation during the list makes it warm again
            del self._idle_since[name]  # this idle period is settled, whatever the gateway says
            status = statuses.get(name)
            if status is None or status.replicas == 0 or not may_scale_to_zero(status.labels):
                continue
            try:
                await client.scale(name, 0)
            except FunctionNotFound:
                continue  # deleted meanwhile: the reconciler, if on, deploys it again
            except GatewayError as exc:  # the gateway's own zero-duration still scales it down
                self._warnings.warn("scaling idle function %r to zero failed: %s", name, exc)
                continue
            seconds = self._keep_alive[name].seconds
            log.info("function %s idle past its keep-alive (%.1f s): scaled to zero", name, seconds)
            scaled.append(name)
            for listener in self.scaled_down:
                listener(name)
            if self.observer is not None:
                self.observer.observe_scale_down(name)
        return scaled

    async def _read_labels(self, client: GatewayClient) -> dict[str, FunctionStatus]:
        statuses = {status.name: status for status in await client.list_functions()}
        self._learn(status for status in statuses.values() if status.name in self._bytes)
        return statuses

    def _learn(self, statuses: Iterable[FunctionStatus]) -> None:
        for status in statuses:
            fixed = keep_alive_s(status.labels) or self.default_fixed_s
            if self._fixed_s.get(status.name) != fixed:
                self._fixed_s[status.name] = fixed
                self._choose(status.name)

    def _choose(self, name: str) -> None:
        history = self._histories[name]
        break_even = break_even_s(history.cold_start_s(), self._bytes[name], self._plan_bytes)
        fixed = self._fixed_s.get(name, self.default_fixed_s)
        chosen = choose_keep_alive(history.gaps, fixed, break_even, self.settings)
        if self._keep_alive.get(name) != chosen:
            self._keep_alive[name] = chosen
            if self.observer is not None:
                self.observer.observe_keep_alive(name, chosen.seconds)

    async def _guarded(self, call: Coroutine[Any, Any, object]) -> None:
        try:
            await call
        except GatewayError as exc:  # the next pass is the retry; meanwhile the labels scale functions down
            self._warnings.warn("the idler could not list the gateway's functions: %s", exc)
