"""Deploys a plan's functions on the gateway, as `faasmoe deploy` does, with the scaling each system stands for.

The deployments come from faasmoe.planning (the code behind `faasmoe deploy` and `faasmoe stack`);
the benchmark only chooses the scaling labels: scale to zero after the idle timeout for the faasmoe
systems, or always on (scale.min 1, no scale to zero) for the static baseline.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx

from faasmoe.bench.settings import BenchSettings
from faasmoe.errors import FaasmoeError
from faasmoe.gateway.client import GatewayClient, GatewaySettings
from faasmoe.gateway.schemas import FunctionStatus
from faasmoe.planning.deploy import deploy_plan
from faasmoe.planning.plan import Plan
from faasmoe.planning.stack import StackSettings
from faasmoe.process import wait_until

_POLL_S = 0.2


def stack_settings(plan_dir: Path, always_on: bool, bench: BenchSettings) -> StackSettings:
    threads = bench.function_threads or function_threads(Plan.load(plan_dir), os.cpu_count() or 1)
    return StackSettings(
        weights_uri=str(plan_dir.resolve()),
        scale_min=1 if always_on else 0,
        scale_zero=not always_on,
        zero_duration=f"{round(bench.idle_timeout * 1000)}ms",
        threads=threads,
    )


def function_threads(plan: Plan, cores: int) -> int:
    """The machine's cores divided among the functions that one MoE layer calls at once."""
    per_layer = max(sum(1 for f in plan.functions if layer in f.layers) for layer in plan.model.moe_layers)
    return max(1, cores // per_layer)


def deploy(gateway_url: str, plan_dir: Path, settings: StackSettings) -> list[str]:
    """Deploys every function of the plan; returns their names."""

    async def run() -> list[str]:
        async with GatewayClient(GatewaySettings(base_url=gateway_url, trust_env=False)) as client:
            return await deploy_plan(Plan.load(plan_dir), client, settings)

    return asyncio.run(run())


def wait_warm(gateway_url: str, names: list[str], timeout_s: float) -> None:
    """Until every named function has a ready replica (the static baseline is warm before measuring)."""
    with httpx.Client(base_url=gateway_url, timeout=10.0, trust_env=False) as http:

        def warm() -> bool:
            statuses = [FunctionStatus.model_validate(s) for s in http.get("/system/functions").json()]
            return all(s.available_replicas > 0 for s in statuses if s.name in names)

        if not wait_until(warm, timeout_s, _POLL_S):
            raise FaasmoeError(f"functions not warm within {timeout_s:g} s: {names}")
