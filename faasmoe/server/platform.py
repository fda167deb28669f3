"""Everything one control plane serves with: tenants, engines (per mode), tokenizer, metrics, gateway.

Loaded once before the HTTP server starts, so a bad checkpoint, plan or tenants file fails the start
with a clear message instead of failing requests later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from faasmoe.dispatch.factory import executor_factory
from faasmoe.dispatch.remote import InvocationLog
from faasmoe.gateway.client import GatewayClient, GatewaySettings
from faasmoe.model.split_model import SplitModel
from faasmoe.server.metrics import Metrics
from faasmoe.server.orchestrator import Orchestrator
from faasmoe.server.settings import ServeSettings
from faasmoe.server.tenants import TenantRegistry

GATEWAY_CHECK_TTL_S = 2.0  # /ready probes the gateway at most this often


@dataclass
class Platform:
    settings: ServeSettings
    tenants: TenantRegistry
    orchestrator: Orchestrator
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))
    gateway: GatewayClient | None = None  # opened on the server's event loop (connection pools are per loop)
    _gateway_checked: tuple[float, bool] = (0.0, False)

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
        return cls(settings, tenants, orchestrator, metrics)

    @property
    def model(self) -> SplitModel:
        return self.orchestrator.model

    @property
    def max_prompt_tokens(self) -> int:
        context = self.model.checkpoint.config.max_position_embeddings
        return min(self.settings.max_prompt_tokens or context, context)

    def open_gateway(self) -> None:
        if self.settings.gateway is not None:
            self.gateway = GatewayClient(GatewaySettings.from_url(self.settings.gateway, _basic_auth(self.settings)))

    async def gateway_reachable(self) -> bool:
        """True without a gateway (experts in-process); else the gateway's /healthz, briefly cached."""
        if self.gateway is None:
            return True
        checked_at, ok = self._gateway_checked
        if time.monotonic() - checked_at > GATEWAY_CHECK_TTL_S:
            ok = await self.gateway.healthz()
            self._gateway_checked = (time.monotonic(), ok)
        return ok

    async def metrics_page(self) -> bytes:
        if self.gateway is not None:
            try:
                self.metrics.set_replicas(await self.gateway.list_functions())
            except Exception:  # metrics stay available with the gateway down; /ready reports that
                pass
        return self.metrics.render(self.orchestrator.active_sequences())

    async def close(self) -> None:
        if self.gateway is not None:
            await self.gateway.aclose()

    def stop(self) -> None:
        self.orchestrator.stop()


def _basic_auth(settings: ServeSettings) -> str | None:
    return settings.gateway_basic_auth.get_secret_value() if settings.gateway_basic_auth else None
