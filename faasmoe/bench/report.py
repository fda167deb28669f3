"""The benchmark's report: every figure and the exact configuration (bench.json), and a Markdown table (bench.md)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel

from faasmoe.bench.breakdown import StepFigures
from faasmoe.bench.cost_model import CostModelFigures
from faasmoe.bench.elasticity import TARGET_COLD_PENALTY_VS_WAKE, ElasticityFigures
from faasmoe.bench.metrics import Percentiles, SystemResult
from faasmoe.bench.profiling import ProfileSource
from faasmoe.bench.settings import SystemKind
from faasmoe.planning.cost import cheapest
from faasmoe.planning.grouping import Grouping

# The FaaSMoE paper (Qwen1.5-MoE-A2.7B, 6 tenants, CPU-only): average total memory (GB) and CPU (%).
PAPER = {
    "full-per-tenant": {"memory_gb": 217.52, "cpu_pct": 1127},
    "static-experts": {"memory_gb": 50.38, "cpu_pct": 429},
    "faasmoe-shared": {"memory_gb": 72.25, "cpu_pct": 326},
    "faasmoe-private": {"memory_gb": 90.98, "cpu_pct": 408},
}
# Our targets, as ratios (printed, not asserted).
TARGET_MEMORY_VS_FULL = 0.20
TARGET_MEMORY_VS_FULL_SHARED = 0.6
TARGET_CPU_VS_FULL = 0.25
TARGET_TPOT_VS_FULL_SHARED = 1.25
TARGET_SATURATION_VS_FULL_SHARED = 0.85  # at least
TARGET_CPU_PER_TOKEN_VS_FULL_SHARED = 1.10
TARGET_CALL_OVERHEAD_P50_MS = 0.3
TARGET_COST_MODEL_ERROR = 0.25  # abs(modelled / measured - 1) of function GB-s
TARGET_POPULARITY_GB_S = 0.8  # popularity / contiguous function GB-s, same functions
TARGET_POPULARITY_COLD_STARTS = 0.0  # popularity - contiguous cold starts per request: no more
TARGET_AUTO_RANK = 3  # auto's pick among the cheapest measured
JSON_FILE = "bench.json"
MARKDOWN_FILE = "bench.md"

MEMORY_ACCOUNTING = (
    "Memory is read from /proc every sample period for every process of the system under test (the "
    "control-plane servers, the gateway and every function replica, found by walking the process trees). "
    "**PSS** (proportional set size) is the headline: shared pages (torch's libraries, page-cache pages "
    "mapped by several processes) are divided among the processes sharing them, so the PSS of all processes "
    "adds up to the physical memory the system holds. Anonymous (private copies: weights, KV caches, heaps) "
    "and file-backed resident memory are reported separately; file-backed pages are summed per process, so "
    "shared libraries count once per process there. Averages are time-weighted over the measured window "
    "(from the trace's start until it ends and every request has finished); GB-s is the PSS integral "
    "(1 GB = 1e9 bytes). CPU-seconds are user + system time of the same processes within the window (model "
    "loading before the window excluded; function cold starts inside it included). Cold starts are function "
    "processes started inside the window; fn replicas are the function processes alive, time-averaged. The "
    "cost prices memory-time at a public serverless rate (AWS Lambda x86, $/GB-s as in the settings): 'fns' "
    "bills only the expert functions, 'all' every process."
)
BREAKDOWN_NOTE = (
    "Per decode step (steps that computed no prompt), means in ms, from the servers' /metrics over the "
    "window: trunk + expert hand-off + expert wait = the step's mean. Trunk: attention, norms, routers, "
    "shared experts, LM head and sampling. Expert hand-off: the time inside the executor's submit, i.e. "
    "scatter and encode with functions, or the routed experts' whole compute in-process (the full-model "
    "systems). Expert wait: blocked on the functions after the shared expert. Calls: function "
    "invocations per step (every phase); a warm call's compute is the function's own (its compute "
    "header), its overhead the round trip minus that (gateway queueing, transport, thread hops, "
    "decoding); percentiles are interpolated within the histograms' buckets. Trace rows include steps "
    "that waited for cold starts (see the cold starts above); saturation rows are warm, closed loop with "
    "N streams. CPU-s / token: every process of the system over the window."
)


MEMORY_NOTE = (
    "Weights: the bytes of weight files the system holds once everything is resident (one model, or one per "
    "tenant for full-per-tenant): what it cannot hold less than while fully warm. PSS above the weights is "
    "the rest: torch and its libraries, KV caches, buffers, copies. An extrapolated row measured one copy "
    "serving one tenant's share of the trace and multiplies its memory, CPU, cost and weights by the "
    "tenants (its shared libraries too, which N processes would share: a slight overestimate); its request "
    "figures are that copy's own."
)
COLD_NOTE = (
    "Cold requests arrived after the whole system had been idle (no request in flight) for longer than the "
    "keep-alive label plus one reaper period, so every function was at zero; warm requests were sent after "
    "the latest cold request's first token; those in between queued behind the cold start and are neither. "
    "Wake all: before the trace, every function of the plan at zero is asked for one replica at once "
    "(POST /system/scale-function/{name}), timed until each has been ready; the median of the wakes. "
    f"Target: cold p99 - warm p99 <= {TARGET_COLD_PENALTY_VS_WAKE:g}x wake all (cold starts paid at once, "
    "not layer after layer). On one machine waking N functions costs about the sum of their loads."
)
PREWARM_NOTE = (
    "Invocations: function calls in the window. Misses: invocations that met their function at zero and "
    "started it themselves (replica starts less prewarm wakes that scaled a function from zero); hit rate = "
    "1 - misses / invocations, the share that found their function warm or already starting. Wasted: "
    "replicas started and never invoked before they stopped (replica starts less invocations that met a "
    "fresh replica). Lookahead (prewarm predicted): of the layers it guessed, the share of (token, expert) "
    "choices it foresaw (slot accuracy, FATE's figure) and of invoked functions it named ahead (foreseen)."
)
KEEP_ALIVE_NOTE = (
    "Met cold: requests in flight while a function replica started (in shared mode every running request's "
    "next step waits for a function the step invokes; a wasted prewarm counts too). Function GB-s: the "
    "replicas' PSS integral over the window. Scale-downs: functions the control plane scaled to zero, idle "
    "past their keep-alive (adaptive; fixed leaves it to the gateway's idle timeout). Adaptive is a Pareto "
    "improvement over fixed (same granularity and prewarm) with no more of either and less of one."
)
COST_NOTE = (
    "Per faasmoe-shared run, the deployment cost model (faasmoe/planning/cost.py, docs/deployment-cost.md) "
    "against the run. Function GB-s: the replicas' PSS integral over the window; cold starts / request: replica "
    "starts in the window per request sent. Modelled GB-s: the model given what the run had. The routing profile "
    "above. The keep-alive K: the zero-duration label (--idle-timeout) plus half a gateway reaper period, the mean "
    "wait before the reaper sees a function idle. Memory as PSS measures it (the model's --memory resident): a warm "
    "function's base MiB (--base-memory-mib, else a replica's PSS when every function was woken before the trace, "
    "before any invocation touched its weights; replicas forked from the gateway's runtime share it, far below a "
    "container's 384 MiB request) plus the pages of each of its experts invoked in the last K seconds. The "
    "load: at every sample time the model is asked at the rate of the tokens routed in the last K seconds (its "
    "warm share, 1 - exp(-lambda K), is the chance of an invocation in the last K seconds whatever the load did "
    "before) and its GB-s per second are summed over the window. Fn replicas: measured function processes and "
    "modelled warm functions, time-averaged. The model counts neither adaptive keep-alive stopping functions "
    "before K nor prewarming waking functions that no step invokes. Measured $: function GB-s, replica starts and "
    "invocations at the model's prices (a cold start at cost.py's default: the whole plan's experts held for the "
    "model's cold-start seconds). Modelled $/h at mean load: the model at the trace's routed tokens over its "
    "duration, as `faasmoe export --experts-per-function auto --tokens-per-second R` prices a candidate; auto's "
    "pick is its argmin (cost.py's cheapest) over the plans measured with one elasticity mode. A popularity plan "
    "has its contiguous pair's experts per function: the same function count."
)


@dataclass(frozen=True)
class SystemFailure:
    system: str
    error: str


@dataclass(frozen=True)
class TargetCheck:
    """One target evaluated for one faasmoe-shared granularity."""

    target: str
    system: str
    value: float | None
    limit: float
    met: bool | None  # None: a system it needs was not run or failed


@dataclass
class BenchReport:
    command: str
    machine: str
    settings: dict
    model: dict
    trace: dict
    results: list[SystemResult]
    failures: list[SystemFailure] = field(default_factory=list)
    targets: list[TargetCheck] = field(default_factory=list)
    profile: ProfileSource | None = None  # the routing profile of the cost model and the popularity plans

    def to_json(self) -> str:
        payload = asdict(self)
        payload["paper"] = PAPER
        payload["memory_accounting"] = MEMORY_ACCOUNTING
        return json.dumps(payload, indent=2, default=_jsonable) + "\n"

    def to_markdown(self) -> str:
        lines = [
            "# faasmoe bench",
            "",
            f"`{self.command}`",
            "",
            f"Machine: {self.machine}. Model: {_model_line(self.model)}. Workload: {_trace_line(self.trace)}.",
            "",
            *markdown_table(self.results, self.failures),
            "",
            MEMORY_ACCOUNTING,
            "",
            "## Memory against weights",
            "",
            *memory_table(self.results),
            "",
            MEMORY_NOTE,
            "",
            "## Step-time breakdown",
            "",
            *breakdown_table(self.results),
            "",
            BREAKDOWN_NOTE,
            "",
            *elasticity_sections(self.results),
            *cost_sections(self.results, self.profile),
        ]
        if self.targets:
            lines += ["## Targets", "", *targets_table(self.targets), ""]
        return "\n".join(lines)


def evaluate_targets(results: list[SystemResult]) -> list[TargetCheck]:
    """Every faasmoe-shared run against full-per-tenant, static-experts and full-shared."""
    by_kind: dict[str, list[SystemResult]] = {}
    for result in results:
        by_kind.setdefault(result.kind, []).append(result)
    full = _first(by_kind, SystemKind.FULL_PER_TENANT)
    static = _first(by_kind, SystemKind.STATIC_EXPERTS)
    shared = _first(by_kind, SystemKind.FULL_SHARED)
    checks: list[TargetCheck] = []
    for run in by_kind.get(SystemKind.FAASMOE_SHARED.value, []):
        memory = _ratio(run.memory.avg_pss_gb, full.memory.avg_pss_gb if full else None)
        versus_shared = _ratio(run.memory.avg_pss_gb, shared.memory.avg_pss_gb if shared else None)
        cpu = _ratio(run.cpu.cpu_s, full.cpu.cpu_s if full else None)
        versus_static = _ratio(run.memory.avg_pss_gb, static.memory.avg_pss_gb if static else None)
        tpot = _ratio(run.requests.tpot_s.p50, shared.requests.tpot_s.p50 if shared else None)
        checks += [
            _check("avg memory vs full-per-tenant", run.system, memory, TARGET_MEMORY_VS_FULL),
            _check("avg memory vs full-shared", run.system, versus_shared, TARGET_MEMORY_VS_FULL_SHARED),
            _check("CPU-seconds vs full-per-tenant", run.system, cpu, TARGET_CPU_VS_FULL),
            _check("avg memory vs static-experts (< 1)", run.system, versus_static, 1.0, strict=True),
            _check("TPOT p50 vs full-shared", run.system, tpot, TARGET_TPOT_VS_FULL_SHARED),
        ]
        if run.elasticity is not None:
            ratio, limit = run.elasticity.cold.penalty_vs_wake, TARGET_COLD_PENALTY_VS_WAKE
            checks.append(_check("cold - warm TTFT p99 vs wake all", run.system, ratio, limit))
        overhead = run.steps.call_overhead_s.p50 if run.steps else None
        if overhead is not None:
            ms = overhead * 1e3
            checks.append(_check("call overhead p50 ms (trace)", run.system, ms, TARGET_CALL_OVERHEAD_P50_MS))
        if run.saturation is not None:
            baseline = shared.saturation if shared else None
            throughput = _ratio(run.saturation.throughput_tok_s, baseline.throughput_tok_s if baseline else None)
            per_token = _ratio(run.saturation.cpu_s_per_token, baseline.cpu_s_per_token if baseline else None)
            minimum, cpu_limit = TARGET_SATURATION_VS_FULL_SHARED, TARGET_CPU_PER_TOKEN_VS_FULL_SHARED
            checks += [
                _check("saturation tok/s vs full-shared (>=)", run.system, throughput, minimum, at_least=True),
                _check("saturation CPU-s/token vs full-shared", run.system, per_token, cpu_limit),
            ]
    return checks + cost_targets(results)


def markdown_table(results: list[SystemResult], failures: list[SystemFailure]) -> list[str]:
    header = (
        "| system | functions | avg PSS GB | peak PSS GB | avg anon GB | avg file GB | GB-s | CPU-s | avg CPU % "
        "| TTFT p50 / p99 s | TPOT p50 / p99 ms | e2e p50 / p99 s | out tok/s | cold starts | avg fn replicas "
        "| cost fns / all $ | ok / sent |"
    )
    columns = header.count("|") - 1
    lines = [header, "|" + "---|" * columns]
    for r in results:
        m, c, q, f = r.memory, r.cpu, r.requests, r.functions
        lines.append(
            f"| {system_cell(r)} | {f.deployed or '-'} | {m.avg_pss_gb:.2f} | {m.peak_pss_gb:.2f} "
            f"| {m.avg_anon_gb:.2f} | {m.avg_file_gb:.2f} | {m.pss_gb_s:.0f} | {c.cpu_s:.1f} | {c.avg_cpu_pct:.0f} "
            f"| {_pair(q.ttft_s, 1, 2)} | {_pair(q.tpot_s, 1000, 0)} | {_pair(q.e2e_s, 1, 2)} "
            f"| {q.throughput_tok_s:.1f} | {f.cold_starts} | {_opt(f.avg_replicas, 1)} "
            f"| {r.cost.function_usd:.5f} / {r.cost.total_usd:.5f} | {q.completed} / {q.requests} |"
        )
    for failure in failures:
        cells = ["failed: " + (failure.error.splitlines() or [""])[0][:80]] + [""] * (columns - 2)
        lines.append(f"| {failure.system} | " + " | ".join(cells) + " |")
    return lines


def system_cell(result: SystemResult) -> str:
    """The system's label, marked when its figures are extrapolated from one copy."""
    e = result.extrapolated
    return result.system if e is None else f"{result.system} (extrapolated: 1 copy x{e.copies})"


def memory_table(results: list[SystemResult]) -> list[str]:
    """Each system's PSS next to its weight bytes, and its average against the full-model baselines."""
    full = next((r for r in results if r.kind == SystemKind.FULL_PER_TENANT.value), None)
    shared = next((r for r in results if r.kind == SystemKind.FULL_SHARED.value), None)
    lines = [
        "| system | weights GB | avg PSS GB | peak PSS GB | peak PSS / weights | avg PSS vs full-per-tenant "
        "| avg PSS vs full-shared |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r.memory
        versus = [_ratio(m.avg_pss_gb, b.memory.avg_pss_gb if b else None) for b in (full, shared)]
        lines.append(
            f"| {system_cell(r)} | {r.weights_gb:.3g} | {m.avg_pss_gb:.2f} | {m.peak_pss_gb:.2f} "
            f"| {_opt(_ratio(m.peak_pss_gb, r.weights_gb), 2)} | {_opt(versus[0], 3)} | {_opt(versus[1], 3)} |"
        )
    return lines


def elasticity_sections(results: list[SystemResult]) -> list[str]:
    """The cold-start, prewarm and keep-alive tables of the systems whose functions scale to zero."""
    runs = [r for r in results if r.elasticity is not None]
    if not runs:
        return []
    return [
        "## Cold starts after idle",
        "",
        *cold_table(runs),
        "",
        COLD_NOTE,
        "",
        "## Prewarm: hit rate and waste",
        "",
        *prewarm_table(runs),
        "",
        PREWARM_NOTE,
        "",
        "## Keep-alive: adaptive against fixed",
        "",
        *keep_alive_table(runs),
        "",
        KEEP_ALIVE_NOTE,
        "",
    ]


def cold_table(runs: list[SystemResult]) -> list[str]:
    lines = [
        "| system | idle before cold s | cold / warm requests | cold TTFT p99 s | warm TTFT p99 s | cold - warm s "
        "| wake all s (functions, runs) | (cold - warm) / wake all | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c = _elastic(r).cold
        if c.wake is None:
            wake = "-"
        else:
            wake = f"{_opt(c.wake.median_s, 2)} ({c.wake.functions}, {len(c.wake.runs_s)})"
            wake += f"; {c.wake.error}" if c.wake.error else ""
        met = _check("", r.system, c.penalty_vs_wake, TARGET_COLD_PENALTY_VS_WAKE).met
        lines.append(
            f"| {r.system} | > {c.idle_s:g} | {c.cold_requests} / {c.warm_requests} | {_opt(c.cold_ttft_p99_s, 2)} "
            f"| {_opt(c.warm_ttft_p99_s, 2)} | {_opt(c.penalty_s, 2)} | {wake} | {_opt(c.penalty_vs_wake, 2)} "
            f"| {_met(met)} |"
        )
    return lines


def prewarm_table(runs: list[SystemResult]) -> list[str]:
    lines = [
        "| system | prewarm | invocations | replica starts | wakes (already up, failed) | misses | hit rate "
        "| wasted prewarms | lookahead slot accuracy | lookahead foreseen |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        e = _elastic(r)
        p = e.prewarms
        lines.append(
            f"| {r.system} | {e.prewarm or 'default'} | {p.invocations} | {p.replica_starts} "
            f"| {p.wakes} ({p.already_up}, {p.failed_wakes}) | {p.misses} | {_opt(p.hit_rate, 3)} | {p.wasted} "
            f"| {_opt(p.lookahead_slot_accuracy, 3)} | {_opt(p.lookahead_foreseen, 3)} |"
        )
    return lines


def keep_alive_table(runs: list[SystemResult]) -> list[str]:
    """Every run, and on each adaptive row its difference to the fixed run of the same plan and prewarm."""
    lines = [
        "| system | keep-alive | requests met cold / sent | fresh-replica invocations | function GB-s "
        "| avg fn replicas | scale-downs | vs fixed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fixed = {_pair_key(r): r for r in runs if _elastic(r).keep_alive == "fixed"}
    for r in runs:
        e = _elastic(r)
        k = e.keep_alive_cost
        versus = "-"
        baseline = fixed.get(_pair_key(r)) if e.keep_alive == "adaptive" else None
        if baseline is not None:
            b = _elastic(baseline).keep_alive_cost
            cold, gb_s = k.met_cold - b.met_cold, k.function_gb_s - b.function_gb_s
            pareto = cold <= 0 and gb_s <= 0 and (cold < 0 or gb_s < 0)
            versus = f"{cold:+d} met cold, {gb_s:+.1f} GB-s: Pareto {'yes' if pareto else '**no**'}"
        lines.append(
            f"| {r.system} | {e.keep_alive or 'default'} | {k.met_cold} / {k.requests} "
            f"| {e.prewarms.fresh_replica_invocations} | {k.function_gb_s:.1f} | {_opt(r.functions.avg_replicas, 1)} "
            f"| {k.scale_downs} | {versus} |"
        )
    return lines


def _elastic(result: SystemResult) -> ElasticityFigures:
    assert result.elasticity is not None
    return result.elasticity


def _pair_key(result: SystemResult) -> tuple[str, int | None, int | None, str | None]:
    """What an adaptive run is compared on: the system kind, its plan and its prewarm mode."""
    return result.kind, result.experts_per_function, result.layers_per_function, _elastic(result).prewarm


@dataclass(frozen=True)
class AutoPick:
    """`auto`'s pick among the faasmoe-shared plans measured with one elasticity mode, ranked by what they cost."""

    mode: str
    candidates: int
    pick: SystemResult
    rank: int  # by measured $, 1 the cheapest
    cheapest: SystemResult  # measured


def cost_sections(results: list[SystemResult], profile: ProfileSource | None) -> list[str]:
    """The cost model against each faasmoe-shared run, popularity against contiguous plans, and auto's pick."""
    runs = [r for r in results if r.cost_model is not None]
    if not runs:
        return []
    lines = ["## Cost-aware plans", ""]
    if profile is not None:
        lines += [f"Routing profile: {profile.trace}; {profile.requests} requests, {profile.routed_tokens} routed "
                  f"tokens (`{profile.file}`).", ""]  # fmt: skip
    lines += [*cost_table(runs), ""]
    if pairs := popularity_pairs(runs):
        lines += [*pairs_table(pairs), ""]
    if picks := auto_picks(runs):
        lines += [*auto_table(picks), ""]
    return [*lines, COST_NOTE, ""]


def cost_table(runs: list[SystemResult]) -> list[str]:
    lines = [
        "| system | grouping | functions | function GB-s | cold starts / request | base MiB | modelled GB-s "
        "| modelled / measured | fn replicas measured / modelled | measured $ | modelled $/h at mean load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c, measured = _modelled(r), _elastic(r).keep_alive_cost.function_gb_s
        lines.append(
            f"| {r.system} | {r.grouping} | {r.functions.deployed} | {measured:.1f} | {_opt(_cold_per_request(r), 2)} "
            f"| {c.base_memory_mib} | {c.modelled_gb_s:.1f} | {_opt(_ratio(c.modelled_gb_s, measured), 2)} "
            f"| {_opt(r.functions.avg_replicas, 1)} / {c.modelled_replicas:.1f} | {c.measured_usd:.5f} "
            f"| {c.steady.cost_per_hour:.4f} |"
        )
    return lines


def pairs_table(pairs: list[tuple[SystemResult, SystemResult]]) -> list[str]:
    lines = [
        "| popularity | contiguous | functions | function GB-s popularity / contiguous "
        "| cold starts / request popularity - contiguous | modelled GB-s popularity / contiguous |",
        "|---|---|---|---|---|---|",
    ]
    for popular, contiguous in pairs:
        modelled = _ratio(_modelled(popular).modelled_gb_s, _modelled(contiguous).modelled_gb_s)
        lines.append(
            f"| {popular.system} | {contiguous.system} | {popular.functions.deployed} "
            f"| {_opt(_gb_s_ratio(popular, contiguous), 3)} | {_opt(_cold_difference(popular, contiguous), 2)} "
            f"| {_opt(modelled, 3)} |"
        )
    return lines


def auto_table(picks: list[AutoPick]) -> list[str]:
    lines = [
        "| elasticity | plans measured | auto's pick | its modelled $/h | its rank by measured $ | cheapest measured |",
        "|---|---|---|---|---|---|",
    ]
    for p in picks:
        lines.append(
            f"| {p.mode} | {p.candidates} | {p.pick.system} | {_modelled(p.pick).steady.cost_per_hour:.4f} "
            f"| {p.rank} | {p.cheapest.system} |"
        )
    return lines


def cost_targets(results: list[SystemResult]) -> list[TargetCheck]:
    """The cost model's error per run, popularity against contiguous per pair, and auto's pick per mode."""
    runs = [r for r in results if r.cost_model is not None]
    checks = []
    for r in runs:
        ratio = _ratio(_modelled(r).modelled_gb_s, _elastic(r).keep_alive_cost.function_gb_s)
        error = None if ratio is None else abs(ratio - 1)
        checks.append(_check("cost model error: abs(modelled / measured - 1), function GB-s", r.system, error,
                             TARGET_COST_MODEL_ERROR))  # fmt: skip
    for popular, contiguous in popularity_pairs(runs):
        checks += [
            _check("function GB-s popularity / contiguous", popular.system, _gb_s_ratio(popular, contiguous),
                   TARGET_POPULARITY_GB_S),
            _check("cold starts / request popularity - contiguous", popular.system,
                   _cold_difference(popular, contiguous), TARGET_POPULARITY_COLD_STARTS),
        ]  # fmt: skip
    for p in auto_picks(runs):
        target = f"auto's pick: rank by measured $ of {p.candidates} plans ({p.mode})"
        checks.append(_check(target, p.pick.system, p.rank, TARGET_AUTO_RANK))
    return checks


def popularity_pairs(runs: list[SystemResult]) -> list[tuple[SystemResult, SystemResult]]:
    """Each popularity run with the contiguous run of the same experts and layers per function and elasticity."""
    contiguous = {_plan_key(r): r for r in runs if r.grouping == Grouping.CONTIGUOUS.value}
    return [
        (r, contiguous[_plan_key(r)])
        for r in runs
        if r.grouping == Grouping.POPULARITY.value and _plan_key(r) in contiguous
    ]


def auto_picks(runs: list[SystemResult]) -> list[AutoPick]:
    """Per elasticity mode with several granularities measured: cost.py's argmin at the trace's mean load, and
    its rank among the same plans by measured $."""
    by_mode: dict[str, list[SystemResult]] = {}
    for r in runs:
        by_mode.setdefault(_mode(r), []).append(r)
    picks = []
    for mode, group in by_mode.items():
        if len({r.experts_per_function for r in group}) < 2:
            continue  # no granularity to choose: the groupings are compared pairwise
        chosen = cheapest([_modelled(r).steady for r in group])
        pick = next(r for r in group if _modelled(r).steady is chosen)
        measured = sorted(group, key=lambda r: _modelled(r).measured_usd)
        picks.append(AutoPick(mode, len(group), pick, measured.index(pick) + 1, measured[0]))
    return picks


def _modelled(result: SystemResult) -> CostModelFigures:
    assert result.cost_model is not None
    return result.cost_model


def _mode(result: SystemResult) -> str:
    e = _elastic(result)
    return f"{e.prewarm}+{e.keep_alive}"


def _plan_key(result: SystemResult) -> tuple[str, int | None, int | None, str]:
    """What a popularity run is compared on: the system kind, experts and layers per function and elasticity."""
    return result.kind, result.experts_per_function, result.layers_per_function, _mode(result)


def _cold_per_request(result: SystemResult) -> float | None:
    sent = result.requests.requests
    return result.functions.cold_starts / sent if sent else None


def _gb_s_ratio(run: SystemResult, baseline: SystemResult) -> float | None:
    return _ratio(_elastic(run).keep_alive_cost.function_gb_s, _elastic(baseline).keep_alive_cost.function_gb_s)


def _cold_difference(run: SystemResult, baseline: SystemResult) -> float | None:
    cold, base = _cold_per_request(run), _cold_per_request(baseline)
    return None if cold is None or base is None else cold - base


def breakdown_table(results: list[SystemResult]) -> list[str]:
    """Where each system's decode steps went: one row for the trace, one for the saturation run."""
    header = (
        "| system | run | decode steps | step p50 / mean ms | trunk ms | expert hand-off ms | expert wait ms "
        "| calls / step | call compute p50 ms | call overhead p50 / p99 ms | out tok/s | CPU-s / token |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        if r.steps is not None:
            copies = r.extrapolated.copies if r.extrapolated else 1  # the tokens are the one copy's
            tokens = r.requests.output_tokens
            per_token = r.cpu.cpu_s / copies / tokens if tokens else None
            lines.append(_breakdown_row(r.system, "trace", r.steps, r.requests.throughput_tok_s, per_token))
        if r.saturation is not None:
            sat = r.saturation
            run = f"saturation, {sat.streams} streams"
            lines.append(_breakdown_row(r.system, run, sat.steps, sat.throughput_tok_s, sat.cpu_s_per_token))
    return lines


def _breakdown_row(system: str, run: str, s: StepFigures, tok_s: float, cpu_per_token: float | None) -> str:
    calls = "-" if s.calls_per_step is None else f"{s.calls_per_step:.1f}"
    return (
        f"| {system} | {run} | {s.decode_steps} | {_pair_mean(s.step_s)} | {_ms(s.trunk_s)} "
        f"| {_ms(s.expert_submit_s)} | {_ms(s.expert_wait_s)} | {calls} | {_ms(s.call_compute_s.p50, 2)} "
        f"| {_pair(s.call_overhead_s, 1000, 2)} | {tok_s:.1f} | {_opt(cpu_per_token, 3)} |"
    )


def targets_table(checks: list[TargetCheck]) -> list[str]:
    lines = ["| target | system | value | limit | met |", "|---|---|---|---|---|"]
    for check in checks:
        value = "n/a" if check.value is None else f"{check.value:.3f}"
        lines.append(f"| {check.target} | {check.system} | {value} | {check.limit:g} | {_met(check.met)} |")
    return lines


def _met(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "**no**")


def _first(by_kind: dict[str, list[SystemResult]], kind: SystemKind) -> SystemResult | None:
    runs = by_kind.get(kind.value)
    return runs[0] if runs else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def _check(
    target: str, system: str, value: float | None, limit: float, strict: bool = False, at_least: bool = False
) -> TargetCheck:
    if value is None:
        met = None
    elif at_least:
        met = value >= limit
    else:
        met = value < limit if strict else value <= limit
    return TargetCheck(target, system, value, limit, met)


def _pair(p: Percentiles, scale: float, digits: int) -> str:
    if p.p50 is None or p.p99 is None:
        return "-"
    return f"{p.p50 * scale:.{digits}f} / {p.p99 * scale:.{digits}f}"


def _pair_mean(p: Percentiles) -> str:
    if p.p50 is None or p.mean is None:
        return "-"
    return f"{p.p50 * 1000:.1f} / {p.mean * 1000:.1f}"


def _ms(seconds: float | None, digits: int = 1) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.{digits}f}"


def _opt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _model_line(model: dict) -> str:
    config = model.get("config", {})
    fields = ", ".join(f"{k}={v}" for k, v in config.items())
    layers = f"{model['moe_layers']} MoE layers; " if "moe_layers" in model else ""
    skew = model.get("router_skew")
    if skew is not None:
        layers = f"router skew {skew:g} ({'Zipf' if skew > 0 else 'none'}); " + layers
    return f"{model.get('preset') or 'checkpoint'} ({layers}{fields})"


def _jsonable(value: object) -> object:
    """What asdict leaves for bench.json to encode: pydantic models (the cost model's estimates), else text."""
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else str(value)


def _trace_line(trace: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in trace.get("params", {}).items())
    return (
        f"{trace.get('tenants')} tenants, {trace.get('requests')} requests, {trace.get('duration_s')} s "
        f"({trace.get('source')}{'; ' + params if params else ''})"
    )


def write_report(report: BenchReport, out: Path) -> None:
    """Writes bench.json and bench.md into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_FILE).write_text(report.to_json())
    (out / MARKDOWN_FILE).write_text(report.to_markdown())
