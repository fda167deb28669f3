"""Everything one control plane serves with: tenants, engines (per mode), tokenizer, metrics, gateway, reconciler.

Loaded once before the HTTP server starts, so a bad checkpoint, plan or tenants file fails the start
with a clear message instead of failing requests later.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

from faasmoe.dispatch.executor import open_executor
from faasmoe.dispatch.remote import GatewayConnection, InvocationLog
from faasmoe.gateway.client import GatewayClient, GatewayError, GatewaySettings
from faasmoe.model.split_model import SplitModel
from faasmoe.server.metrics import Metrics
from faasmoe.server.orchestrator import Orchestrator
from faasmoe.server.reconciler import Reconciler
from faasmoe.server.settings import ServeSettings
from faasmoe.server.tenants import TenantRegistry

log = logging.getLogger(__name__)
READY_CHECK_TTL_S = 2.0  # /ready asks the gateway at most this often


@dataclass
class Platform:
    settings: ServeSettings
    tenants: TenantRegistry
    orchestrator: Orchestrator
    metrics: Metrics
    reconciler: Reconciler
    # The one gateway client: every engine's invocations, /ready, metrics and the reconciler run on its loop.
    gateway: GatewayConnection | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    _reconciling: Future[None] | None = None
    _readiness: tuple[float, str | None] = (float("-inf"), None)  # (checked at, why not ready)

    @classmethod
    def load(cls, settings: ServeSettings) -> Platform:
        tenants = TenantRegistry.load(settings.tenants)
        metrics = Metrics()
        log = InvocationLog(keep=False, observers=[metrics.observe_invocation])
        gateway = _open_gateway(settings)
        opener = partial(open_executor, gateway=gateway, log=log)

        def load_model() -> SplitModel:
            return SplitModel.load(settings.model, settings.plan, opener)

        try:
            orchestrator = Orchestrator.start(settings.mode, list(tenants.tenants), load_model, settings.scheduler)
        except BaseException:
            if gateway is not None:
                gateway.close()
            raise
        for engine in orchestrator.engines.values():
            engine.step_observers.append(
                lambda batch, seconds, name=engine.name: metrics.observe_step(name, len(batch), seconds)
            )
        functions = settings.functions if settings.reconcile else None
        reconciler = Reconciler(orchestrator.model.plan, functions, settings.reconcile_interval_s)
        return cls(settings, tenants, orchestrator, metrics, reconciler, gateway)

    @property
    def model(self) -> SplitModel:
        return self.orchestrator.model

    @property
    def max_prompt_tokens(self) -> int:
        context = self.model.checkpoint.config.max_position_embeddings
        return min(self.settings.max_prompt_tokens or context, context)

    def open(self) -> None:
        """When the server starts: the reconciler, if reconciling (on the gateway connection's loop)."""
        if self.gateway is not None and self.settings.reconcile:
            self._reconciling = self.gateway.submit(self.reconciler.run)
            self._reconciling.add_done_callback(_log_if_failed)

    async def not_ready(self) -> str | None:
        """Why requests cannot be served now (None when they can), checked at most every READY_CHECK_TTL_S.

        The model is loaded before the server listens; with a gateway, it must answer and run every
        function of the plan as planned.
        """
        if self.gateway is None:
            return None
        checked_at, reason = self._readiness
        if time.monotonic() - checked_at > READY_CHECK_TTL_S:
            reason = await self.gateway.run(self._gateway_problem)
            self._readiness = (time.monotonic(), reason)
        return reason

    async def _gateway_problem(self, gateway: GatewayClient) -> str | None:
        if not await gateway.healthz():
            return "the gateway is unreachable"
        try:
            return (await self.reconciler.compare(gateway)).problem
        except GatewayError as exc:  # its message names the gateway's URL: /ready is public
            return f"the gateway did not list its functions (HTTP {exc.status})"

    async def metrics_page(self) -> bytes:
        if self.gateway is not None:
            try:
                self.metrics.set_replicas(await self.gateway.run(lambda client: client.list_functions()))
            except Exception:  # metrics stay available with the gateway down; /ready reports that
                pass
        return self.metrics.render(self.orchestrator.active_sequences())

    async def close(self) -> None:
        """When the server stops: the reconciler (the connection stays open until the engines stop)."""
        if self._reconciling is not None:
            self._reconciling.cancel()

    def stop(self) -> None:
        self.orchestrator.stop()
        if self.gateway is not None:  # after the engines: a step in flight still needs the connection
            self.gateway.close()


def _log_if_failed(reconciling: Future[None]) -> None:
    # It retries gateway errors itself: anything else ended it, and the server would not say so otherwise.
    if not reconciling.cancelled() and reconciling.exception() is not None:
        log.error("the reconciler stopped", exc_info=reconciling.exception())


def _open_gateway(settings: ServeSettings) -> GatewayConnection | None:
    if settings.gateway is None:
        return None
    auth = settings.gateway_basic_auth.get_secret_value() if settings.gateway_basic_auth else None
    return GatewayConnection(GatewaySettings.from_url(settings.gateway, auth))
