"""The deployment cost model: what a plan is expected to cost per hour at a routing profile's load.

After Liu, Wang and Wu (INFOCOM'25): a deployment is billed for its functions' memory-time, and pays for
cold starts and per-invocation overhead; the cheapest one is chosen. Per tenant t, with r_t tokens/s (the
profile's, or --tokens-per-second split in the profile's proportions) in steps of n tokens
(``tokens_per_step``), and the popularity predictor's P_t(f | n) (faasmoe/elastic/predictor.py: the
probability that a step of n of t's tokens invokes function f in any of its layers) and P_t(f, l | n)
(in layer l alone), per function f:

    lambda_f     = sum_t r_t / n * P_t(f | n)                  steps/s that invoke f: its arrivals
    calls_f      = sum_t r_t / n * sum_l P_t(f, l | n)         invocations/s (one per layer it serves)
    warm_f       = 1 - exp(-lambda_f K)                        share of time warm, Poisson arrivals, keep-alive K
    GB-s/h       = sum_f warm_f * memory_f * 3600              memory_f = shard + base_memory_mib (stack.py), GB = 1e9 B
                                                               (``memory = billed``: what a platform bills a
                                                               function sized to its shard)
    GB-s/h       = (sum_f warm_f * base + sum_e touched_e * bytes_e) * 3600     (``memory = resident``)
                   touched_e = 1 - exp(-lambda_e K): expert e's pages are resident, a replica maps its shard
                   and faults in only the experts invoked (experts/shard.py); what PSS measures on one node
    colds/h      = sum_f lambda_f exp(-lambda_f K) * 3600      arrivals that find no arrival in the last K
    $/h          = GB-s/h * price_per_gb_s + colds/h * price_per_cold_start + calls/h * price_per_invocation

and invocations per token = sum_f calls_f / sum_t r_t. The defaults, and why, are in docs/deployment-cost.md.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from faasmoe.elastic.keep_alive import GB, KeepAliveSettings
from faasmoe.elastic.predictor import PopularityPredictor, PredictorSettings
from faasmoe.elastic.routing_profile import RoutingProfile, RoutingProfileError
from faasmoe.elastic.routing_stats import RoutingStats
from faasmoe.gateway.durations import PositiveDuration, parse_positive_duration
from faasmoe.planning.grouping import Grouping
from faasmoe.planning.plan import FunctionSpec, ModelShape, Plan
from faasmoe.planning.profile import frozen_stats, popularity, tenant_token_rates
from faasmoe.planning.stack import BASE_MEMORY_MIB, StackSettings, memory_bytes, sized_plan

CE_FUNCTION_CAP = 15  # OpenFaaS Community Edition's functions per installation (docs/openfaas.md)
HOUR_S = 3600.0


class Memory(str, enum.Enum):
    BILLED = "billed"  # a warm function holds its whole shard and base: a container sized to it
    RESIDENT = "resident"  # a warm function holds its base and the pages of its experts invoked lately


class CostSettings(BaseModel):
    """Prices and load of the cost model (`faasmoe plan-cost`, `faasmoe export --experts-per-function auto`)."""

    model_config = ConfigDict(extra="forbid")

    # AWS Lambda's x86 prices (us-east-1): a public, per-use reference for serverless memory-time and requests.
    price_per_gb_s: float = Field(0.0000166667, ge=0, description="dollars per GB-s of function memory held warm")
    price_per_invocation: float = Field(0.0000002, ge=0, description="dollars per invocation ($0.20 per million)")
    cold_start_s: float = Field(
        KeepAliveSettings.model_fields["cold_start_s"].default, gt=0, description="seconds a cold start stalls a step"
    )
    price_per_cold_start: float | None = Field(
        None, ge=0, description="dollars per cold start; None: cold_start_s x the plan's expert GB x price_per_gb_s"
    )
    zero_duration: PositiveDuration = Field(
        StackSettings.model_fields["zero_duration"].default, description="keep-alive: the plan's zero-duration label"
    )
    tokens_per_second: float | None = Field(None, gt=0, description="the load; None: the profile's")
    tokens_per_step: int = Field(1, ge=1, description="a tenant's tokens per step (1: decode of one sequence)")
    base_memory_mib: int = Field(BASE_MEMORY_MIB, ge=0, description="a replica's memory besides its weights")
    memory: Memory = Field(Memory.BILLED, description="billed: shard + base while warm; resident: touched pages")
    predictor: PredictorSettings = PredictorSettings()

    def cold_start_price(self, plan: Plan) -> float:
        """Dollars per cold start: the given price, or the whole plan held idle for the step it stalls
        (keep_alive.break_even_s's reasoning)."""
        if self.price_per_cold_start is not None:
            return self.price_per_cold_start
        return self.cold_start_s * sum(f.bytes for f in plan.functions) / GB * self.price_per_gb_s


class PlanEstimate(BaseModel):
    """One plan's modelled figures per hour at the load."""

    given: bool  # the plan asked about, rather than a candidate
    grouping: Grouping
    experts_per_function: int
    layers_per_function: int
    functions: int
    fits_ce: bool  # at most CE_FUNCTION_CAP functions
    warm_functions: float  # expected functions warm at any moment
    gb_s_per_hour: float
    cold_starts_per_hour: float
    invocations_per_hour: float
    invocations_per_token: float
    cost_per_hour: float  # dollars

    @property
    def name(self) -> str:
        return f"{self.grouping.value} e{self.experts_per_function} l{self.layers_per_function}"


def estimate(plan: Plan, profile: RoutingProfile, settings: CostSettings, given: bool = False) -> PlanEstimate:
    """The model's figures for ``plan`` at ``profile``'s load (or ``settings.tokens_per_second``)."""
    rates = token_rates(profile, plan.model.num_experts_per_tok, settings.tokens_per_second)
    stats = frozen_stats(profile)
    layers, owner = _pieces(plan, lambda pair: pair[0])
    arrivals = _arrivals(plan, stats, settings, rates)  # lambda_f, steps/s
    calls = torch.zeros(len(plan.functions), dtype=torch.float64).index_add_(  # invocations/s
        0, owner, _arrivals(layers, stats, settings, rates)
    )
    keep_alive = parse_positive_duration(settings.zero_duration)
    warm = -torch.expm1(-arrivals * keep_alive)
    if settings.memory is Memory.BILLED:
        stack = StackSettings(base_memory_mib=settings.base_memory_mib)
        memory_gb = torch.tensor([memory_bytes(f.bytes, stack) / GB for f in plan.functions], dtype=torch.float64)
        gb_s_per_hour = float((warm * memory_gb).sum()) * HOUR_S
    else:
        experts, expert_owner = _pieces(plan, lambda pair: pair)
        touched = -torch.expm1(-_arrivals(experts, stats, settings, rates) * keep_alive)
        expert_gb = torch.tensor([f.bytes / len(f.experts) / GB for f in plan.functions], dtype=torch.float64)
        base_gb = settings.base_memory_mib * 2**20 / GB
        gb_s_per_hour = float((warm * base_gb).sum() + (touched * expert_gb[expert_owner]).sum()) * HOUR_S
    cold_starts_per_hour = float((arrivals * torch.exp(-arrivals * keep_alive)).sum()) * HOUR_S
    invocations_per_hour = float(calls.sum()) * HOUR_S
    cold_start_price = settings.cold_start_price(plan)
    cost = (
        gb_s_per_hour * settings.price_per_gb_s
        + cold_starts_per_hour * cold_start_price
        + invocations_per_hour * settings.price_per_invocation
    )
    return PlanEstimate(
        given=given,
        grouping=plan.grouping,
        experts_per_function=plan.experts_per_function,
        layers_per_function=plan.layers_per_function,
        functions=len(plan.functions),
        fits_ce=len(plan.functions) <= CE_FUNCTION_CAP,
        warm_functions=float(warm.sum()),
        gb_s_per_hour=gb_s_per_hour,
        cold_starts_per_hour=cold_starts_per_hour,
        invocations_per_hour=invocations_per_hour,
        invocations_per_token=invocations_per_hour / (sum(rates.values()) * HOUR_S),
        cost_per_hour=cost,
    )


def token_rates(profile: RoutingProfile, top_k: int, tokens_per_second: float | None) -> dict[str, float]:
    """Tokens/s per tenant: the profile's own rates, or ``tokens_per_second`` split in their proportions.

    Without tenants a given rate is one unknown tenant's, predicted with the all-tenants posterior."""
    rates = tenant_token_rates(profile, top_k)
    if tokens_per_second is None:
        if not rates:
            raise RoutingProfileError("the routing profile has no traffic to derive a load: give --tokens-per-second")
        return rates
    if not rates:
        return {"": tokens_per_second}
    total = sum(rates.values())
    return {tenant: tokens_per_second * rate / total for tenant, rate in rates.items()}


def candidate_sizes(num_experts: int) -> list[int]:
    """Experts per function tried by ``auto``: the powers of two below E, and E (a whole layer)."""
    return [1 << i for i in range(math.ceil(math.log2(num_experts)))] + [num_experts]


def candidates(
    shape: ModelShape,
    layers_per_function: int,
    profile: RoutingProfile,
    groupings: Sequence[Grouping] = tuple(Grouping),
) -> list[Plan]:
    """Every size of ``candidate_sizes`` in each grouping, sized as `faasmoe export` would write them."""
    hot = popularity(profile)
    return [
        sized_plan(shape, size, layers_per_function, grouping, hot)
        for size in candidate_sizes(shape.num_experts)
        for grouping in groupings
    ]


def estimate_candidates(
    shape: ModelShape,
    layers_per_function: int,
    profile: RoutingProfile,
    settings: CostSettings,
    groupings: Sequence[Grouping] = tuple(Grouping),
) -> list[PlanEstimate]:
    """The estimate of every candidate, in ``candidates``' order."""
    plans = candidates(shape, layers_per_function, profile, groupings)
    return [estimate(plan, profile, settings) for plan in plans]


def compare(plan: Plan, profile: RoutingProfile, settings: CostSettings) -> list[PlanEstimate]:
    """`faasmoe plan-cost`: the given plan's estimate, then every candidate's with its layers per function."""
    others = estimate_candidates(plan.model, plan.layers_per_function, profile, settings)
    return [estimate(plan, profile, settings, given=True), *others]


def cheapest(estimates: list[PlanEstimate]) -> PlanEstimate:
    """The lowest modelled cost; of equals the first (smaller functions, contiguous before popularity)."""
    return min(estimates, key=lambda e: e.cost_per_hour)


def _arrivals(plan: Plan, stats: RoutingStats, settings: CostSettings, rates: dict[str, float]) -> torch.Tensor:
    """Per function of ``plan``, the steps per second that invoke it, summed over the tenants' loads."""
    predictor, n = PopularityPredictor(plan, stats, settings.predictor), settings.tokens_per_step
    arrivals = torch.zeros(len(plan.functions), dtype=torch.float64)
    for tenant, rate in rates.items():
        arrivals += rate / n * torch.tensor(list(predictor.wake_probabilities(tenant, n).values()), dtype=torch.float64)
    return arrivals


def _pieces(plan: Plan, key: Callable[[tuple[int, int]], object]) -> tuple[Plan, torch.Tensor]:
    """The plan cut into one function per (function, ``key`` of its (layer, expert) pairs): per layer, for
    per-layer invocation probabilities, or per expert; and the index of each piece's function."""
    pieces, owner = [], []
    for index, function in enumerate(plan.functions):
        groups: dict[object, list[tuple[int, int]]] = {}
        for pair in function.experts:
            groups.setdefault(key(pair), []).append(pair)
        for number, experts in enumerate(groups.values()):
            layers = sorted({layer for layer, _ in experts})
            pieces.append(FunctionSpec(name=f"{function.name}/{number}", shard="", layers=layers, experts=experts))
            owner.append(index)
    view = Plan(model=plan.model, experts_per_function=plan.experts_per_function, layers_per_function=1,
                grouping=plan.grouping, functions=pieces)  # fmt: skip
    return view, torch.tensor(owner, dtype=torch.int64)
