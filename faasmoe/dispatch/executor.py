"""The executor for a plan: its functions through a gateway, or, without one, every shard in-process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from faasmoe.dispatch.local import LocalTransport
from faasmoe.dispatch.remote import GatewayConnection, InvocationLog, RemoteTransport
from faasmoe.dispatch.scatter import DispatchExecutor
from faasmoe.gateway.client import GatewaySettings
from faasmoe.planning.plan import Plan


def open_executor(
    plan: Plan,
    plan_dir: Path,
    gateway: GatewaySettings | GatewayConnection | None = None,
    log: InvocationLog | None = None,
    ready_replicas: Callable[[str], int] | None = None,
) -> DispatchExecutor:
    """The ExpertExecutor SplitMoeBlock calls (``SplitModel.load``'s ``open_executor``).

    ``gateway``: settings open a connection that the executor closes with itself; a GatewayConnection is
    shared (the control plane's, for all its engines) and stays open for its owner to close. ``log``
    records the invocations; ``ready_replicas`` says which functions have several replicas to split calls over.
    """
    if gateway is None:
        return DispatchExecutor(plan, LocalTransport(plan, plan_dir))
    if isinstance(gateway, GatewayConnection):
        return DispatchExecutor(plan, RemoteTransport(gateway, log, owns_gateway=False), ready_replicas)
    return DispatchExecutor(plan, RemoteTransport(GatewayConnection(gateway), log, owns_gateway=True), ready_replicas)
