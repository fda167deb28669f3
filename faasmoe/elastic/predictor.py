"""The popularity predictor: per function of the plan, how likely the next step of a tenant invokes it.

Per MoE layer l, expert choice is a categorical whose probabilities have a Dirichlet posterior built from
the decayed routing statistics (routing_stats.py), hierarchically:

    all tenants:  m_l = (G_l + a) / (sum G_l + E a)          G_l: every tenant's slots, a: prior_strength
    tenant t:     p_tl = (c_tl + b m_l) / (sum c_tl + b)     c_tl: t's slots, b: tenant_prior_strength

so a tenant with few observations is predicted as all tenants are, and one with many by its own counts.
p_tl is the posterior predictive of one slot's expert. Function f holds the experts S_l of layer l
(none for layers it does not serve); one slot misses it with probability 1 - p_tl(S_l). Treating a
token's k slots and a step's n tokens as independent draws from p_tl:

    P(f invoked by n tokens) = 1 - prod_l (1 - p_tl(S_l)) ** (k n)

The approximation: a router picks k distinct experts (so one token reaches a little more than k
independent draws would), and a prefill's tokens are alike (so n of them reach fewer experts than n
independent ones would). Both matter little once the counts are large and S_l holds several experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field

from faasmoe.elastic.routing_stats import RoutingStats
from faasmoe.planning.plan import Plan


class PredictorSettings(BaseModel):
    prior_strength: float = Field(1.0, gt=0, description="pseudo-slots per expert of the all-tenants prior")
    tenant_prior_strength: float = Field(
        64.0, gt=0, description="pseudo-slots of the all-tenants posterior in each tenant's prior"
    )


class PopularityPredictor:
    def __init__(self, plan: Plan, stats: RoutingStats, settings: PredictorSettings | None = None) -> None:
        if stats.moe_layers != plan.model.moe_layers or stats.num_experts != plan.model.num_experts:
            raise ValueError("the routing statistics are not of the plan's model")
        self.stats = stats
        self.settings = settings or PredictorSettings()
        self.top_k = plan.model.num_experts_per_tok
        self.functions = [function.name for function in plan.functions]
        # holds[f, l, e]: function f holds expert e of the l-th MoE layer.
        row = {layer: index for index, layer in enumerate(stats.moe_layers)}
        self._holds = torch.zeros(len(plan.functions), len(stats.moe_layers), stats.num_experts, dtype=torch.float64)
        for index, function in enumerate(plan.functions):
            for layer, expert in function.experts:
                self._holds[index, row[layer], expert] = 1.0

    def expert_probabilities(self, tenant: str) -> torch.Tensor:
        """[L, E]: the posterior predictive of one slot's expert per MoE layer, for ``tenant``."""
        _, tables = self.stats.decayed()
        shape = (len(self.stats.moe_layers), self.stats.num_experts)
        every = sum(tables.values(), torch.zeros(shape, dtype=torch.float64))
        a, b = self.settings.prior_strength, self.settings.tenant_prior_strength
        overall = (every + a) / (every.sum(-1, keepdim=True) + a * shape[1])
        own = tables.get(tenant, torch.zeros(shape, dtype=torch.float64))
        return (own + b * overall) / (own.sum(-1, keepdim=True) + b)

    def wake_probabilities(self, tenant: str, tokens: int) -> dict[str, float]:
        """Per function name of the plan: the probability that a step processing `tokens` new tokens of
        `tenant` invokes it (in any layer it serves)."""
        if tokens < 0:
            raise ValueError("tokens must not be negative")
        held = torch.einsum("fle,le->fl", self._holds, self.expert_probabilities(tenant))  # [F, L]
        # log of one slot missing f in every layer; the clamp keeps a certain expert finite.
        miss = torch.log1p(-held.clamp(max=1 - 1e-12)).sum(-1)  # [F]
        invoked = -torch.expm1(miss * self.top_k * tokens)
        return dict(zip(self.functions, invoked.tolist(), strict=True))


@dataclass(frozen=True)
class StepRecord:
    """One step as it happened: whose, how many new tokens, which functions it invoked."""

    tenant: str
    tokens: int
    invoked: frozenset[str]


@dataclass(frozen=True)
class Evaluation:
    hit_rate: float  # share of invocations of functions predicted at or above the threshold
    wasted_wakes: int  # functions predicted at or above the threshold that the step did not invoke
    wakes: int  # functions predicted at or above the threshold, in all
    invocations: int


def evaluate(
    predict: Callable[[str, int], dict[str, float]], steps: Iterable[StepRecord], threshold: float
) -> Evaluation:
    """How a predictor (e.g. ``PopularityPredictor.wake_probabilities``) does on recorded steps."""
    hits = wasted = wakes = invocations = 0
    for step in steps:
        woken = {name for name, p in predict(step.tenant, step.tokens).items() if p >= threshold}
        hits += len(woken & step.invoked)
        wasted += len(woken - step.invoked)
        wakes += len(woken)
        invocations += len(step.invoked)
    return Evaluation(hits / invocations if invocations else 1.0, wasted, wakes, invocations)
