"""`faasmoe deploy`: every function of a plan deployed (or updated) through the gateway REST API.

The Python equivalent of `faas-cli deploy -f stack.yml`: the same FunctionDeployment fields as stack.yml
(from planning/stack.py), so it works against the embedded gateway and a real OpenFaaS alike.
"""

from __future__ import annotations

from collections.abc import Callable

from faasmoe.gateway.client import GatewayClient
from faasmoe.gateway.schemas import FunctionDeployment
from faasmoe.planning.plan import Plan
from faasmoe.planning.stack import StackSettings, deployment_for


async def deploy_plan(
    plan: Plan, client: GatewayClient, settings: StackSettings, on_function: Callable[[str], None] | None = None
) -> list[str]:
    """Deploys new functions and updates existing ones; returns the names deployed."""
    existing = {f.name for f in await client.list_functions()}
    for function in plan.functions:
        deployment = FunctionDeployment.model_validate(deployment_for(function, settings))
        if function.name in existing:
            await client.update(deployment)
        else:
            await client.deploy(deployment)
        if on_function:
            on_function(function.name)
    return [f.name for f in plan.functions]
