"""`faasmoe deploy`: every function of a plan deployed (or updated) through the gateway REST API.

The Python equivalent of `faas-cli deploy -f stack.yml`: the same FunctionDeployment fields as stack.yml
(from planning/stack.py), so it works against the embedded gateway and a real OpenFaaS alike.
"""

from __future__ import annotations

from collections.abc import Callable

from faasmoe.gateway.client import GatewayClient
from faasmoe.gateway.schemas import FunctionDeployment, FunctionStatus
from faasmoe.planning.plan import Plan
from faasmoe.planning.stack import StackSettings, deployment_for


async def deploy_plan(
    plan: Plan, client: GatewayClient, settings: StackSettings, on_function: Callable[[str], None] | None = None
) -> list[str]:
    """Deploys new functions and updates existing ones; returns the names deployed."""
    existing = {f.name for f in await client.list_functions()}
    for deployment in plan_deployments(plan, settings):
        await apply(client, deployment, exists=deployment.service in existing)
        if on_function:
            on_function(deployment.service)
    return [f.name for f in plan.functions]


def plan_deployments(plan: Plan, settings: StackSettings) -> list[FunctionDeployment]:
    return [FunctionDeployment.model_validate(deployment_for(function, settings)) for function in plan.functions]


async def apply(client: GatewayClient, deployment: FunctionDeployment, *, exists: bool) -> None:
    """Deploys the function, or updates it where the gateway already has one of its name."""
    if exists:
        await client.update(deployment)
    else:
        await client.deploy(deployment)


def differs(status: FunctionStatus, deployment: FunctionDeployment) -> bool:
    """Whether the deployed function lacks what ``deployment`` sets: its image, an env var, label or annotation.

    Extra env vars, labels and annotations are no difference: OpenFaaS adds its own, and updating a
    function for them would restart it at every comparison.
    """
    return (
        status.image != deployment.image
        or not deployment.env_vars.items() <= status.env_vars.items()
        or not deployment.labels.items() <= status.labels.items()
        or not deployment.annotations.items() <= status.annotations.items()
    )
