"""Everything one control plane serves with: tenants, engines (per mode), tokenizer, metrics, gateway, reconciler.

Loaded once before the HTTP server starts, so a bad checkpoint, plan or tenants file fails the start
with a clear message instead of failing requests later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from faasmoe.dispatch.factory import executor_factory
from faasmoe.dispatch.remote import InvocationLog
from faasmoe.gateway.client import GatewayClient, GatewayError, GatewaySettings
from faasmoe.model.split_model import SplitModel
from faasmoe.planning.plan import Plan
from faasmoe.server.metrics import Metrics
from faasmoe.server.orchestrator import Orchestrator
from faasmoe.server.reconciler import Reconciler
from faasmoe.server.settings import ServeSettings
from faasmoe.server.tenants import TenantRegistry

READY_CHECK_TTL_S = 2.0  # /ready asks the gateway at most this often


@dataclass
class Platform:
    settings: ServeSettings
    tenants: TenantRegistry
    orchestrator: Orchestrator
    metrics: Metrics
    reconciler: Reconciler
    created: int = field(default_factory=lambda: int(time.time()))
    gateway: GatewayClient | None = None  # opened on the server's event loop (connection pools are per loop)
    _reconciling: asyncio.Task[None] | None = None
    _readiness: tuple[float, str | None] = (float("-inf"), None)  # (checked at, why not ready)

    @classmethod
    def load(cls, settings: ServeSettings) -> Platform:
        tenants = TenantRegistry.load(settings.tenants)
        metrics = Metrics()
        log = InvocationLog(keep=False, observers=[metrics.observe_invocation])
        make_executor = executor_factory(settings.gateway, _basic_auth(settings), log)

        def load_model() -> SplitModel:
            return SplitModel.load(settings.model, settings.plan, make_executor)

        orchestrator = Orchestrator.start(settings.mode, list(tenants.tenants), load_model, settings.scheduler)
        for engine in orchestrator.engines.values():
            engine.step_observers.append(
                lambda batch, seconds, name=engine.name: metrics.observe_step(name, len(batch), seconds)
            )
        functions = settings.functions if settings.reconcile else None
        reconciler = Reconciler(Plan.load(settings.plan), functions, settings.reconcile_interval_s)
        return cls(settings, tenants, orchestrator, metrics, reconciler)

    @property
    def model(self) -> SplitModel:
        return self.orchestrator.model

    @property
    def max_prompt_tokens(self) -> int:
        context = self.model.checkpoint.config.max_position_embeddings
        return min(self.settings.max_prompt_tokens or context, context)

    def open(self) -> None:
        """On the server's event loop: the gateway client and, if reconciling, the reconciler's task."""
        if self.settings.gateway is None:
            return
        self.gateway = GatewayClient(GatewaySettings.from_url(self.settings.gateway, _basic_auth(self.settings)))
        if self.settings.reconcile:
            self._reconciling = asyncio.get_running_loop().create_task(self.reconciler.run(self.gateway))

    async def not_ready(self) -> str | None:
        """Why requests cannot be served now (None when they can), checked at most every READY_CHECK_TTL_S.

        The model is loaded before the server listens; with a gateway, it must answer and run every
        function of the plan as planned.
        """
        if self.gateway is None:
            return None
        checked_at, reason = self._readiness
        if time.monotonic() - checked_at > READY_CHECK_TTL_S:
            reason = await self._gateway_problem(self.gateway)
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
                self.metrics.set_replicas(await self.gateway.list_functions())
            except Exception:  # metrics stay available with the gateway down; /ready reports that
                pass
        return self.metrics.render(self.orchestrator.active_sequences())

    async def close(self) -> None:
        if self._reconciling is not None:
            self._reconciling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciling
        if self.gateway is not None:
            await self.gateway.aclose()

    def stop(self) -> None:
        self.orchestrator.stop()


def _basic_auth(settings: ServeSettings) -> str | None:
    return settings.gateway_basic_auth.get_secret_value() if settings.gateway_basic_auth else None
