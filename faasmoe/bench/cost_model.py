"""The deployment cost model (faasmoe/planning/cost.py) against a measured faasmoe-shared run.

The model prices a plan from a routing profile and a load; for a run the benchmark gives it what the run had:

- the routing: the profile of the profiling pass (faasmoe/bench/profiling.py), not the run's own;
- the keep-alive K: the functions' zero-duration label (--idle-timeout) plus half a gateway reaper period,
  the mean wait before the reaper sees a function idle. Adaptive keep-alive can stop functions sooner, and
  prewarming can wake functions no step then invokes: the model counts neither;
- memory: resident (what the bench measures, PSS): a warm function's base, --base-memory-mib or else a
  replica's PSS measured when every function was woken before the trace (faasmoe/bench/wake.py), before any
  invocation touched its weights, plus the pages of each of its experts invoked within K (a replica maps
  its shard and faults in only the experts it computes);
- the load. The model's warm share of f, 1 - exp(-lambda_f K), is the chance that f was invoked in the last
  K seconds under Poisson arrivals, and it stays that chance for a load that varies when lambda_f K is the
  arrivals expected in those K seconds. So at every sample time t the model is asked at the rate of the
  tokens routed in (t - K, t] and its GB-s per second are summed over the window: the modelled GB-s. A token
  is routed by the step that reads it: a prompt by the step ending at its first output token, output token i
  by the step ending at token i + 1 (the last one is never read).

``steady`` is the model at the trace's mean load (its routed tokens over its duration), as `faasmoe export
--experts-per-function auto --tokens-per-second R` prices a candidate: the report's argmin is auto's pick.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from faasmoe.bench.loadgen import RequestResult
from faasmoe.bench.settings import BenchSettings
from faasmoe.bench.systems import REAPER_FRACTION
from faasmoe.bench.wake import WakeFigures
from faasmoe.bench.workload import Trace
from faasmoe.elastic.routing_profile import RoutingProfile
from faasmoe.planning.cost import HOUR_S, CostSettings, Memory, PlanEstimate, estimate
from faasmoe.planning.plan import Plan


@dataclass(frozen=True)
class CostModelFigures:
    keep_alive_s: float  # K
    base_memory_mib: int  # given, or measured at the wake
    price_per_cold_start: float  # dollars, the model's and the measured cold starts'
    modelled_gb_s: float  # over the window, at the load of the trailing keep-alive
    modelled_replicas: float  # warm functions, time-averaged over the window
    measured_usd: float  # function GB-s, replica starts and invocations at the model's prices
    steady: PlanEstimate  # per hour at the trace's mean load: what auto compares


def base_memory_mib(settings: BenchSettings, wake: WakeFigures | None) -> int | None:
    """The base memory given, or measured at the wake (None: neither)."""
    if settings.base_memory_mib is not None:
        return settings.base_memory_mib
    return None if wake is None or wake.replica_pss_mib is None else round(wake.replica_pss_mib)


def cost_model_figures(
    plan: Plan,
    profile: RoutingProfile,
    settings: BenchSettings,
    base_mib: int,
    trace: Trace,
    results: list[RequestResult],
    window: tuple[float, float],
    measured: tuple[float, int, int],
) -> CostModelFigures:
    """``window``: (start, end) on the requests' clock; ``measured``: function GB-s, replica starts, invocations."""
    keep_alive_s = settings.idle_timeout * (1 + REAPER_FRACTION / 2)
    cost = CostSettings(price_per_gb_s=settings.price_per_gb_s, zero_duration=f"{round(keep_alive_s * 1000)}ms",
                        base_memory_mib=base_mib, memory=Memory.RESIDENT)  # fmt: skip
    cold_start = cost.cold_start_price(plan)  # measured cold starts cost what the model's do
    gb_s, replicas = _over_window(plan, profile, cost, routed_times(results), window, keep_alive_s,
                                  settings.sample_interval)  # fmt: skip
    steady = cost.model_copy(update={"tokens_per_second": trace.routed_tokens / trace.duration_s})
    function_gb_s, replica_starts, invocations = measured
    usd = function_gb_s * cost.price_per_gb_s + replica_starts * cold_start + invocations * cost.price_per_invocation
    return CostModelFigures(keep_alive_s, base_mib, cold_start, gb_s, replicas, usd, estimate(plan, profile, steady))


def routed_times(results: list[RequestResult]) -> list[float]:
    """When each token was routed, in order (see the module's docstring)."""
    times = []
    for result in results:
        if result.token_times:
            times += [result.token_times[0]] * result.prompt_tokens + result.token_times[1:]
    return sorted(times)


def _over_window(
    plan: Plan,
    profile: RoutingProfile,
    cost: CostSettings,
    routed: list[float],
    window: tuple[float, float],
    keep_alive_s: float,
    step_s: float,
) -> tuple[float, float]:
    """The model's GB-s summed over the window, and its warm functions averaged, one step at a time."""
    start, end = window
    estimates: dict[int, PlanEstimate] = {}  # by tokens in the trailing keep-alive
    gb_s = replica_s = 0.0
    t = start
    while t < end:
        step = min(step_s, end - t)
        t += step
        tokens = bisect.bisect_right(routed, t) - bisect.bisect_right(routed, t - keep_alive_s)
        if tokens == 0:  # nothing invoked in the last K: every function at zero
            continue
        if tokens not in estimates:
            at = cost.model_copy(update={"tokens_per_second": tokens / keep_alive_s})
            estimates[tokens] = estimate(plan, profile, at)
        gb_s += estimates[tokens].gb_s_per_hour / HOUR_S * step
        replica_s += estimates[tokens].warm_functions * step
    return gb_s, replica_s / max(end - start, 1e-9)
