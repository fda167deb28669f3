"""`faasmoe bench`: every system, one after another, on the same model and trace; then the report and plots."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from faasmoe.bench.assets import Assets, prepare_model
from faasmoe.bench.loadgen import RequestResult
from faasmoe.bench.measure import measure
from faasmoe.bench.metrics import GB, SystemResult, extrapolated
from faasmoe.bench.plots import write_plots
from faasmoe.bench.profiling import record_profile
from faasmoe.bench.report import (
    MARKDOWN_FILE,
    BenchReport,
    SystemFailure,
    breakdown_table,
    cost_sections,
    elasticity_sections,
    evaluate_targets,
    markdown_table,
    memory_table,
)
from faasmoe.bench.report import write_report as write_report_files
from faasmoe.bench.settings import BenchSettings, SystemKind
from faasmoe.bench.systems import SystemSpec, launched, system_specs
from faasmoe.bench.workload import Trace, generate_trace, load_trace
from faasmoe.elastic.routing_profile import RoutingProfile
from faasmoe.errors import FaasmoeError
from faasmoe.planning.profile import read_profile

TRACE_FILE = "trace.jsonl"
# What a system may need beyond its weights, to refuse runs that would exhaust memory: a server process
# (torch, tokenizer, KV caches, buffers), and a function replica (torch imported: about 170 MB PSS measured).
SERVER_OVERHEAD_BYTES = 600e6
FUNCTION_OVERHEAD_BYTES = 200e6
# Memory freed by stopped processes can take a moment to show as available again.
SETTLE_S = 1.0


def run_bench(settings: BenchSettings) -> Path:
    """Runs the benchmark; writes bench.md, bench.json, trace.jsonl and the plots (memory, sweep, breakdown) to ``out``.

    Returns the results directory. Every process started is stopped before this returns or raises.
    """
    command, settings = bench_command(settings), settings.resolved()
    console = Console(stderr=True)
    run_dir = settings.work_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    results: list[SystemResult] = []
    failures: list[SystemFailure] = []
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not settings.progress) as progress:
        step = progress.add_task("preparing the model and plans", total=None)
        assets = prepare_model(settings, run_dir / "prepare.log")
        trace = load_trace(settings.trace, settings.seed, assets.model.vocab_size) if settings.trace else None
        trace = trace or generate_trace(settings, assets.model.vocab_size)
        specs = system_specs(settings, assets.model.num_experts, assets.model.num_layers)
        profile = source = None
        if any(spec.kind is SystemKind.FAASMOE_SHARED for spec in specs):  # popularity plans and the cost model
            progress.update(step, description="recording the tenants' routing profile")
            assets, source = record_profile(assets, specs, trace, settings, run_dir / "profile")
            profile = read_profile(assets.profile, assets.model.shape)
            progress.update(step, description="preparing the plans")
        for spec in specs:  # every plan up front, so that exporting never counts as a system's start-up
            assets.plan(spec.experts_per_function, spec.layers_per_function, spec.grouping)
        progress.update(step, description="systems", total=len(specs), completed=0)
        for spec in specs:
            task = progress.add_task(f"  {spec.label}", total=None)
            try:
                tenants = _tenants_that_fit(spec, assets, trace.tenants, settings.full_per_tenant)
                served = trace if tenants == trace.tenants else trace.only(tenants[0])
                progress.update(task, total=len(served.requests))
                log_dir = run_dir / spec.label.replace("/", "-")
                result = _run(spec, assets, trace, served, settings, log_dir,
                              lambda _, t=task: progress.advance(t), profile)  # fmt: skip
                results.append(result)
            except (FaasmoeError, httpx.HTTPError, OSError) as exc:
                failures.append(SystemFailure(spec.label, str(exc)))
                console.print(f"[red]{spec.label} failed:[/red] {str(exc)[:2000]}")
            progress.update(task, visible=False)
            progress.advance(step)
            time.sleep(SETTLE_S)
    report = BenchReport(
        command=command,
        machine=machine(),
        settings=settings.model_dump(mode="json"),
        model={
            "preset": None if settings.model_dir else settings.preset,
            "router_skew": None if settings.model_dir else settings.router_skew,
            "moe_layers": len(assets.model.moe_layers),
            "config": assets.model.summary(),
        },
        trace={
            "source": trace.source,
            "tenants": len(trace.tenants),
            "requests": len(trace.requests),
            "output_tokens": trace.output_tokens,
            "duration_s": trace.duration_s,
            "params": trace.params,
            "file": TRACE_FILE,
        },
        results=results,
        failures=failures,
        targets=evaluate_targets(results),
        profile=source,
    )
    out = settings.out
    write_report_files(report, out)
    write_plots(results, out)
    trace.save(out / TRACE_FILE)
    # The table goes to stdout as Markdown text, ready to paste; progress and notes go to stderr.
    tables = [*markdown_table(results, failures), "", *memory_table(results), "", *breakdown_table(results)]
    print("\n".join([*tables, "", *elasticity_sections(results), *cost_sections(results, source)]))
    console.print(f"wrote {out / MARKDOWN_FILE} (logs in {run_dir})")
    return out


def _run(
    spec: SystemSpec,
    assets: Assets,
    trace: Trace,
    served: Trace,
    settings: BenchSettings,
    log_dir: Path,
    on_request: Callable[[RequestResult], None],
    profile: RoutingProfile | None,
) -> SystemResult:
    """One system on ``served`` (the trace, or one tenant's share of it for a copy of full-per-tenant)."""
    with launched(spec, assets, served.tenants, settings, log_dir) as system:
        result = measure(system, served, settings, on_request, profile)
    copies = len(served.tenants) if spec.kind is SystemKind.FULL_PER_TENANT else 1
    weights = assets.weights_bytes(spec.experts_per_function, spec.layers_per_function, spec.grouping)
    result.weights_gb = copies * weights / GB
    if served is not trace:  # one copy of N: its figures as N copies would show them
        result = extrapolated(result, len(trace.tenants), served.tenants[0])
    return result


def _tenants_that_fit(spec: SystemSpec, assets: Assets, tenants: list[str], full_per_tenant: str) -> list[str]:
    """The tenants the system serves: all of them, or one for full-per-tenant when N copies would not fit
    (``full_per_tenant`` "auto") or when told ("one"). Refuses a run whose worst case (every server and
    every function resident) would exhaust memory."""
    weights = assets.weights_bytes(assets.model.num_experts, assets.model.num_layers)
    available = psutil.virtual_memory().available
    serving = tenants
    if spec.kind is SystemKind.FULL_PER_TENANT:
        all_fit = len(tenants) * (weights + SERVER_OVERHEAD_BYTES) <= available
        if full_per_tenant == "one" or (full_per_tenant == "auto" and not all_fit):
            serving = tenants[:1]
        needed = len(serving) * (weights + SERVER_OVERHEAD_BYTES)
    elif spec.kind is SystemKind.FULL_SHARED:
        needed = weights + SERVER_OVERHEAD_BYTES
    else:
        plan = assets.plan(spec.experts_per_function, spec.layers_per_function, spec.grouping)
        functions = len(list((plan / "functions").glob("*.safetensors")))
        needed = weights + SERVER_OVERHEAD_BYTES + functions * FUNCTION_OVERHEAD_BYTES
    if needed > available:
        raise FaasmoeError(
            f"skipped: may need about {needed / 1e9:.1f} GB, {available / 1e9:.1f} GB available "
            "(fewer --layers or tenants, more experts/layers per function, or --full-per-tenant auto)"
        )
    return serving


def machine() -> str:
    memory = psutil.virtual_memory().total / 2**30
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {memory:.0f} GiB, {platform.system()}"


def bench_command(settings: BenchSettings) -> str:
    """The `faasmoe bench` command line that reproduces these settings."""
    parts = ["faasmoe bench"]
    for name, value in settings.model_dump(mode="json", include=settings.model_fields_set).items():
        option = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(option if value else "--no-" + option[2:])
        elif isinstance(value, list):
            parts.append(f"{option} {','.join(map(str, value))}")
        elif value is not None:
            parts.append(f"{option} {value}")
    return " ".join(parts)
