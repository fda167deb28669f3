"""Turns one system's samples and request results into its figures (every figure the report shows)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, TypeVar

from faasmoe.bench.loadgen import RequestResult
from faasmoe.bench.sampler import ROLES, Sample

if TYPE_CHECKING:  # they build on this module's Percentiles
    from faasmoe.bench.breakdown import StepFigures
    from faasmoe.bench.cost_model import CostModelFigures
    from faasmoe.bench.elasticity import ElasticityFigures
    from faasmoe.bench.saturation import SaturationFigures

GB = 1e9


@dataclass(frozen=True)
class Percentiles:
    """Seconds; None when no request gave the figure."""

    p50: float | None
    p99: float | None
    mean: float | None

    @classmethod
    def of(cls, values: list[float]) -> Percentiles:
        if not values:
            return cls(None, None, None)
        ordered = sorted(values)
        return cls(percentile(ordered, 50), percentile(ordered, 99), sum(ordered) / len(ordered))


@dataclass(frozen=True)
class MemoryFigures:
    """Gigabytes (1e9 bytes) summed over the system's processes; GB-s integrated over the window."""

    avg_pss_gb: float
    peak_pss_gb: float
    avg_anon_gb: float
    peak_anon_gb: float
    avg_file_gb: float
    avg_rss_gb: float
    peak_rss_gb: float
    pss_gb_s: float
    function_pss_gb_s: float
    avg_pss_gb_by_role: dict[str, float]


@dataclass(frozen=True)
class CpuFigures:
    cpu_s: float  # user + system, every process of the system, over the window
    avg_cpu_pct: float  # 100 = one core busy all the time
    cpu_s_by_role: dict[str, float]


@dataclass(frozen=True)
class RequestFigures:
    requests: int
    completed: int
    failed: int
    output_tokens: int
    throughput_tok_s: float  # output tokens over the window
    ttft_s: Percentiles
    tpot_s: Percentiles  # per request: mean gap after the first token
    itl_s: Percentiles  # every inter-token gap of every request (the warm decode step)
    e2e_s: Percentiles
    errors: list[str]  # the first few, for the report


@dataclass(frozen=True)
class FunctionFigures:
    deployed: int
    cold_starts: int  # new function processes seen during the window
    avg_replicas: float | None  # function processes alive (starting or warm), time-averaged (None: no functions)
    peak_replicas: int | None


@dataclass(frozen=True)
class CostFigures:
    price_per_gb_s: float
    function_usd: float  # what the expert functions would be billed: their memory-time x price
    total_usd: float  # every process billed the same way, for comparing with systems without functions


@dataclass(frozen=True)
class Extrapolation:
    """A system measured as one copy of several (full-per-tenant, where N full models do not fit in memory)."""

    copies: int  # memory, CPU, cost and weights are the one copy's times this
    measured_tenant: str  # the copy served this tenant's share of the trace: the request figures are its own


@dataclass
class SystemResult:
    system: str  # label, e.g. "faasmoe-shared/e20"
    kind: str
    experts_per_function: int | None
    layers_per_function: int | None
    window_s: float
    startup_s: float
    memory: MemoryFigures
    cpu: CpuFigures
    requests: RequestFigures
    functions: FunctionFigures
    cost: CostFigures
    steps: StepFigures | None = None  # where the decode steps' time went (None: not read)
    saturation: SaturationFigures | None = None  # the closed-loop run, if asked for and of a saturated kind
    weights_gb: float = 0.0  # weight bytes the system holds with everything resident (a model per copy)
    elasticity: ElasticityFigures | None = None  # systems whose functions scale to zero
    extrapolated: Extrapolation | None = None  # None: every process measured
    grouping: str | None = None  # how the plan's functions group experts (systems whose functions scale to zero)
    cost_model: CostModelFigures | None = None  # the cost model's view of a faasmoe-shared run
    # Time series: (t, total PSS GB) and (t, function processes alive).
    memory_series: list[tuple[float, float]] = field(default_factory=list)
    replica_series: list[tuple[float, int]] = field(default_factory=list)


def extrapolated(result: SystemResult, copies: int, measured_tenant: str) -> SystemResult:
    """``result`` of one copy as ``copies`` copies would show it: memory, CPU, cost and weights times ``copies``
    (the processes' shared libraries too, which N processes would share: a slight overestimate)."""

    return replace(
        result,
        memory=_times(result.memory, copies, [f.name for f in fields(MemoryFigures)]),
        cpu=_times(result.cpu, copies, ["cpu_s", "avg_cpu_pct", "cpu_s_by_role"]),
        cost=_times(result.cost, copies, ["function_usd", "total_usd"]),
        weights_gb=result.weights_gb * copies,
        memory_series=[(t, gb * copies) for t, gb in result.memory_series],
        extrapolated=Extrapolation(copies, measured_tenant),
    )


Figures = TypeVar("Figures", MemoryFigures, CpuFigures, CostFigures)


def _times(figures: Figures, factor: int, names: list[str]) -> Figures:
    """``figures`` with the named fields (numbers, or dicts of numbers) multiplied by ``factor``."""
    scaled = {}
    for name in names:
        value = getattr(figures, name)
        scaled[name] = {k: v * factor for k, v in value.items()} if isinstance(value, dict) else value * factor
    return replace(figures, **scaled)


def percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks of an ascending list."""
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def integrate(samples: list[Sample], value) -> float:
    """Trapezoid integral of ``value(sample)`` over the samples' times."""
    return sum((b.t - a.t) * (value(a) + value(b)) / 2 for a, b in zip(samples, samples[1:], strict=False))


def memory_figures(samples: list[Sample]) -> MemoryFigures:
    window = max(samples[-1].t - samples[0].t, 1e-9)

    def gb_s(field: str, role: str | None = None) -> float:
        return integrate(samples, lambda s: s.total(field, role)) / GB

    def average(field: str, role: str | None = None) -> float:
        return gb_s(field, role) / window if len(samples) > 1 else samples[0].total(field, role) / GB

    def peak(field: str) -> float:
        return max(s.total(field) for s in samples) / GB

    return MemoryFigures(
        avg_pss_gb=average("pss"),
        peak_pss_gb=peak("pss"),
        avg_anon_gb=average("anon"),
        peak_anon_gb=peak("anon"),
        avg_file_gb=average("file"),
        avg_rss_gb=average("rss"),
        peak_rss_gb=peak("rss"),
        pss_gb_s=gb_s("pss"),
        function_pss_gb_s=gb_s("pss", "function"),
        avg_pss_gb_by_role={role: average("pss", role) for role in ROLES},
    )


def cpu_figures(samples: list[Sample]) -> CpuFigures:
    window = max(samples[-1].t - samples[0].t, 1e-9)
    last = samples[-1]
    return CpuFigures(
        cpu_s=last.total_cpu_s,
        avg_cpu_pct=100 * last.total_cpu_s / window,
        cpu_s_by_role={role: last.cpu_s.get(role, 0.0) for role in ROLES},
    )


def request_figures(results: list[RequestResult], window_s: float, max_errors: int = 5) -> RequestFigures:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    return RequestFigures(
        requests=len(results),
        completed=len(ok),
        failed=len(results) - len(ok),
        output_tokens=tokens,
        throughput_tok_s=tokens / max(window_s, 1e-9),
        ttft_s=Percentiles.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_s=Percentiles.of([r.tpot_s for r in ok if r.tpot_s is not None]),
        itl_s=Percentiles.of([gap for r in ok for gap in r.inter_token_s()]),
        e2e_s=Percentiles.of([r.e2e_s for r in ok]),
        errors=sorted({r.error for r in results if r.error})[:max_errors],
    )


def function_figures(deployed: int, cold_starts: int, samples: list[Sample]) -> FunctionFigures:
    if not deployed:
        return FunctionFigures(0, cold_starts, None, None)
    window = samples[-1].t - samples[0].t
    replicas = [s.total("processes", "function") for s in samples]
    average = integrate(samples, lambda s: s.total("processes", "function")) / window if window > 0 else replicas[0]
    return FunctionFigures(deployed, cold_starts, average, max(replicas))


def cost_figures(memory: MemoryFigures, price_per_gb_s: float) -> CostFigures:
    return CostFigures(price_per_gb_s, memory.function_pss_gb_s * price_per_gb_s, memory.pss_gb_s * price_per_gb_s)
