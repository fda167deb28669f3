"""The benchmark's report: every figure and the exact configuration (bench.json), and a Markdown table (bench.md)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from faasmoe.bench.metrics import Percentiles, SystemResult
from faasmoe.bench.settings import SystemKind

# The FaaSMoE paper (Qwen1.5-MoE-A2.7B, 6 tenants, CPU-only): average total memory (GB) and CPU (%).
PAPER = {
    "full-per-tenant": {"memory_gb": 217.52, "cpu_pct": 1127},
    "static-experts": {"memory_gb": 50.38, "cpu_pct": 429},
    "faasmoe-shared": {"memory_gb": 72.25, "cpu_pct": 326},
    "faasmoe-private": {"memory_gb": 90.98, "cpu_pct": 408},
}
# Our targets, as ratios (printed, not asserted).
TARGET_MEMORY_VS_FULL = 0.20
TARGET_CPU_VS_FULL = 0.25
TARGET_TPOT_VS_FULL_SHARED = 1.25
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

    def to_json(self) -> str:
        payload = asdict(self)
        payload["paper"] = PAPER
        payload["memory_accounting"] = MEMORY_ACCOUNTING
        return json.dumps(payload, indent=2, default=str) + "\n"

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
        cpu = _ratio(run.cpu.cpu_s, full.cpu.cpu_s if full else None)
        versus_static = _ratio(run.memory.avg_pss_gb, static.memory.avg_pss_gb if static else None)
        tpot = _ratio(run.requests.tpot_s.p50, shared.requests.tpot_s.p50 if shared else None)
        checks += [
            _check("avg memory vs full-per-tenant", run.system, memory, TARGET_MEMORY_VS_FULL),
            _check("CPU-seconds vs full-per-tenant", run.system, cpu, TARGET_CPU_VS_FULL),
            _check("avg memory vs static-experts (< 1)", run.system, versus_static, 1.0, strict=True),
            _check("TPOT p50 vs full-shared", run.system, tpot, TARGET_TPOT_VS_FULL_SHARED),
        ]
    return checks


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
            f"| {r.system} | {f.deployed or '-'} | {m.avg_pss_gb:.2f} | {m.peak_pss_gb:.2f} | {m.avg_anon_gb:.2f} "
            f"| {m.avg_file_gb:.2f} | {m.pss_gb_s:.0f} | {c.cpu_s:.1f} | {c.avg_cpu_pct:.0f} "
            f"| {_pair(q.ttft_s, 1, 2)} | {_pair(q.tpot_s, 1000, 0)} | {_pair(q.e2e_s, 1, 2)} "
            f"| {q.throughput_tok_s:.1f} | {f.cold_starts} | {_opt(f.avg_replicas, 1)} "
            f"| {r.cost.function_usd:.5f} / {r.cost.total_usd:.5f} | {q.completed} / {q.requests} |"
        )
    for failure in failures:
        cells = ["failed: " + (failure.error.splitlines() or [""])[0][:80]] + [""] * (columns - 2)
        lines.append(f"| {failure.system} | " + " | ".join(cells) + " |")
    return lines


def targets_table(checks: list[TargetCheck]) -> list[str]:
    lines = ["| target | system | value | limit | met |", "|---|---|---|---|---|"]
    for check in checks:
        value = "n/a" if check.value is None else f"{check.value:.3f}"
        met = "n/a" if check.met is None else ("yes" if check.met else "**no**")
        lines.append(f"| {check.target} | {check.system} | {value} | {check.limit:g} | {met} |")
    return lines


def _first(by_kind: dict[str, list[SystemResult]], kind: SystemKind) -> SystemResult | None:
    runs = by_kind.get(kind.value)
    return runs[0] if runs else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def _check(target: str, system: str, value: float | None, limit: float, strict: bool = False) -> TargetCheck:
    met = None if value is None else (value < limit if strict else value <= limit)
    return TargetCheck(target, system, value, limit, met)


def _pair(p: Percentiles, scale: float, digits: int) -> str:
    if p.p50 is None or p.p99 is None:
        return "-"
    return f"{p.p50 * scale:.{digits}f} / {p.p99 * scale:.{digits}f}"


def _opt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _model_line(model: dict) -> str:
    config = model.get("config", {})
    fields = ", ".join(f"{k}={v}" for k, v in config.items())
    return f"{model.get('preset', 'checkpoint')} ({fields})"


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
