"""What a running embedded gateway holds: the functions, the proxy, the metrics, the reaper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
from starlette.requests import Request

from faasmoe.gateway.embedded.environment import inherited
from faasmoe.gateway.embedded.forkserver import ForkServer
from faasmoe.gateway.embedded.metrics import GatewayMetrics
from faasmoe.gateway.embedded.proxy import FunctionProxy
from faasmoe.gateway.embedded.registry import FunctionRegistry
from faasmoe.gateway.embedded.replicas import ReplicaLauncher
from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings

logger = logging.getLogger(__name__)


@dataclass
class GatewayRuntime:
    settings: EmbeddedGatewaySettings
    http: httpx.AsyncClient
    registry: FunctionRegistry
    proxy: FunctionProxy
    metrics: GatewayMetrics
    log_dir: Path
    forkserver: ForkServer | None = None
    reaper: asyncio.Task[None] | None = None

    @classmethod
    def start(cls, settings: EmbeddedGatewaySettings, metrics: GatewayMetrics) -> GatewayRuntime:
        """Build the runtime and start the idle reaper (call inside the running event loop)."""
        log_dir = settings.log_dir or Path(tempfile.mkdtemp(prefix="faasmoe-gateway-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        # One pooled client for readiness probes and forwarding: keep-alive to every replica.
        http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.upstream_timeout_s, connect=settings.upstream_connect_timeout_s),
            limits=httpx.Limits(
                max_connections=settings.upstream_max_connections,
                max_keepalive_connections=settings.upstream_max_keepalive,
            ),
            # Replicas are on loopback: a proxy from the environment must not intercept them.
            trust_env=False,
        )
        forkserver = None
        if settings.function_spawn == "fork" and sys.platform == "linux":
            forkserver = ForkServer(
                log_dir / "function-runtime.log", settings.cold_start_timeout_s, inherited(settings)
            )
        registry = FunctionRegistry(settings, ReplicaLauncher(settings, http, log_dir, forkserver))
        runtime = cls(
            settings=settings,
            http=http,
            registry=registry,
            proxy=FunctionProxy(http, settings.upstream_connect_retries, settings.max_body_bytes),
            metrics=metrics,
            log_dir=log_dir,
            forkserver=forkserver,
        )
        runtime.reaper = asyncio.create_task(registry.run_reaper())
        logger.info("function logs go to %s", log_dir)
        return runtime

    async def close(self) -> None:
        """Stop the reaper and every function process, then the HTTP client."""
        if self.reaper is not None:
            self.reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reaper
        await self.registry.close()
        if self.forkserver is not None:
            await self.forkserver.close()
        await self.http.aclose()


def runtime_of(request: Request) -> GatewayRuntime:
    runtime: GatewayRuntime = request.app.state.runtime
    return runtime
