"""The control plane keeps the gateway's functions as its plan says.

A gateway that restarts comes back with no functions; a person may delete or change one. Every
``interval_s`` the reconciler lists the gateway's functions, compares them with the plan's
deployments (planning/deploy.py, the code behind `faasmoe deploy`), deploys the missing ones and
updates the changed ones. Told no deployments, it only compares: /ready then says what is missing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from faasmoe.gateway.client import GatewayClient, GatewayError
from faasmoe.planning.deploy import apply, differs, plan_deployments
from faasmoe.planning.plan import Plan
from faasmoe.planning.stack import StackSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Drift:
    """The plan's functions the gateway lacks, and those it runs otherwise than the plan deploys them."""

    planned: int
    missing: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    @property
    def problem(self) -> str | None:
        """Why the plan cannot be served as it is (None when it can), without naming functions."""
        parts = [f"{len(self.missing)} not deployed"] if self.missing else []
        parts += [f"{len(self.changed)} deployed otherwise than planned"] if self.changed else []
        return f"of the plan's {self.planned} functions, {' and '.join(parts)}" if parts else None


class Reconciler:
    def __init__(self, plan: Plan, functions: StackSettings | None, interval_s: float) -> None:
        """``functions``: how to deploy the plan's functions; None only compares."""
        self.names = [function.name for function in plan.functions]
        self.deployments = {d.service: d for d in plan_deployments(plan, functions)} if functions else None
        self.interval_s = interval_s

    async def compare(self, gateway: GatewayClient) -> Drift:
        listed = {status.name: status for status in await gateway.list_functions()}
        missing = tuple(name for name in self.names if name not in listed)
        planned = self.deployments or {}
        changed = tuple(name for name, want in planned.items() if name in listed and differs(listed[name], want))
        return Drift(len(self.names), missing, changed)

    async def reconcile(self, gateway: GatewayClient) -> Drift:
        """Deploys what is missing and updates what changed; returns what it found."""
        assert self.deployments is not None, "reconciling needs the deployments"
        drift = await self.compare(gateway)
        for name in drift.missing:
            await apply(gateway, self.deployments[name], exists=False)
        for name in drift.changed:
            await apply(gateway, self.deployments[name], exists=True)
        if drift.problem:
            log.info("reconciled the gateway's functions: deployed %s, updated %s",
                     list(drift.missing), list(drift.changed))  # fmt: skip
        return drift

    async def run(self, gateway: GatewayClient) -> None:
        """Reconciles every ``interval_s`` until cancelled: a failed pass is logged, and the next one is the retry."""
        failing = False
        while True:
            try:
                await self.reconcile(gateway)
            except GatewayError as exc:
                if not failing:  # once per outage, not every interval
                    log.warning("reconciling functions failed; retrying every %g s: %s", self.interval_s, exc)
                failing = True
            else:
                if failing:
                    log.info("reconciling functions works again")
                failing = False
            await asyncio.sleep(self.interval_s)
