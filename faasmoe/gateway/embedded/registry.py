"""The deployed functions: deploy, update, delete, scale, status, and the idle reaper."""

from __future__ import annotations

import asyncio
import logging
import re
import time

from faasmoe.errors import BadRequest
from faasmoe.gateway.embedded.environment import check_runnable
from faasmoe.gateway.embedded.errors import FunctionExists, UnknownFunction
from faasmoe.gateway.embedded.policy import ScalePolicy
from faasmoe.gateway.embedded.pool import FunctionPool
from faasmoe.gateway.embedded.replicas import ReplicaLauncher
from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings
from faasmoe.gateway.schemas import FunctionDeployment, FunctionStatus

logger = logging.getLogger(__name__)

# OpenFaaS function names are DNS-1123 labels; that also keeps them safe as log file names.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_MAX_NAME_LENGTH = 63


class FunctionRegistry:
    def __init__(self, settings: EmbeddedGatewaySettings, launcher: ReplicaLauncher) -> None:
        self.settings = settings
        self.launcher = launcher
        self._pools: dict[str, FunctionPool] = {}

    def names(self) -> list[str]:
        return sorted(self._pools)

    def pool(self, name: str) -> FunctionPool:
        try:
            return self._pools[name]
        except KeyError:
            raise UnknownFunction(f"function {name!r} not found") from None

    def deploy(self, deployment: FunctionDeployment) -> None:
        _check_name(deployment.service)
        if deployment.service in self._pools:
            raise FunctionExists(
                f"function {deployment.service!r} already exists: update it with PUT /system/functions"
            )
        check_runnable(self.settings, deployment)
        policy = ScalePolicy.for_deployment(deployment, self.settings)
        self.launcher.prepare(deployment)
        pool = FunctionPool(deployment, policy, self.launcher, self.settings)
        self._pools[deployment.service] = pool
        pool.reconcile()  # starts the minimum replicas, if any
        logger.info("function %s deployed (log %s)", deployment.service, self.launcher.log_path(pool.name))

    async def update(self, deployment: FunctionDeployment) -> None:
        pool = self.pool(deployment.service)
        check_runnable(self.settings, deployment)
        policy = ScalePolicy.for_deployment(deployment, self.settings)
        self.launcher.prepare(deployment)
        await pool.redeploy(deployment, policy)
        logger.info("function %s updated", deployment.service)

    async def delete(self, name: str) -> None:
        pool = self.pool(name)
        del self._pools[name]
        await pool.close()
        logger.info("function %s deleted", name)

    def scale(self, name: str, replicas: int) -> int:
        return self.pool(name).scale(replicas)

    def status(self, name: str) -> FunctionStatus:
        pool = self.pool(name)
        pool.forget_exited()
        deployment = pool.deployment
        return FunctionStatus(
            name=deployment.service,
            image=deployment.image,
            namespace=deployment.namespace or self.settings.namespace,
            env_process=deployment.env_process,
            env_vars=deployment.env_vars,
            constraints=deployment.constraints,
            secrets=deployment.secrets,
            labels=deployment.labels,
            annotations=deployment.annotations,
            limits=deployment.limits,
            requests=deployment.requests,
            read_only_root_filesystem=deployment.read_only_root_filesystem,
            invocation_count=pool.invocation_count,
            replicas=pool.desired,
            available_replicas=pool.ready_count(),
            created_at=pool.created_at,
        )

    def statuses(self) -> list[FunctionStatus]:
        return [self.status(name) for name in self.names()]

    def reap_once(self, now: float | None = None) -> None:
        """Forget dead replicas and scale idle functions down to their minimum."""
        now = time.monotonic() if now is None else now
        for pool in list(self._pools.values()):
            pool.forget_exited()
            pool.scale_down_if_idle(now)

    async def run_reaper(self) -> None:
        """Loop forever (until cancelled), reaping every ``reaper_interval_s``."""
        while True:
            await asyncio.sleep(self.settings.reaper_interval_s)
            try:
                self.reap_once()
            except Exception:  # a bug here must not end scale-to-zero for the gateway's lifetime
                logger.exception("reaper failed")

    async def close(self) -> None:
        """Stop every function's processes (gateway shutdown)."""
        pools = list(self._pools.values())
        self._pools.clear()
        await asyncio.gather(*(pool.close() for pool in pools), return_exceptions=True)


def _check_name(name: str) -> None:
    if len(name) > _MAX_NAME_LENGTH or not _NAME.fullmatch(name):
        raise BadRequest(
            f"invalid function name {name!r}: use lowercase letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {_MAX_NAME_LENGTH} characters"
        )
