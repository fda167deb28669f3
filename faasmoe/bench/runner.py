"""`faasmoe bench`: every system, one after another, on the same model and trace; then the report and plots."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from faasmoe.bench.assets import Assets, prepare_model
from faasmoe.bench.measure import measure
from faasmoe.bench.metrics import SystemResult
from faasmoe.bench.plots import write_plots
from faasmoe.bench.report import MARKDOWN_FILE, BenchReport, SystemFailure, evaluate_targets, markdown_table
from faasmoe.bench.report import write_report as write_report_files
from faasmoe.bench.settings import BenchSettings, SystemKind
from faasmoe.bench.systems import SystemSpec, launched, system_specs
from faasmoe.bench.workload import generate_trace, load_trace
from faasmoe.errors import FaasmoeError

TRACE_FILE = "trace.jsonl"
# What a system may need beyond its weights, to refuse runs that would exhaust memory: a server process
# (torch, tokenizer, KV caches, buffers), and a function replica (torch imported: about 170 MB PSS measured).
SERVER_OVERHEAD_BYTES = 600e6
FUNCTION_OVERHEAD_BYTES = 200e6
# Memory freed by stopped processes can take a moment to show as available again.
SETTLE_S = 1.0


def run_bench(settings: BenchSettings) -> Path:
    """Runs the benchmark; writes bench.md, bench.json, trace.jsonl, memory.png and sweep.png to ``settings.out``.

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
        for spec in specs:  # every plan up front, so that exporting never counts as a system's start-up
            assets.plan(spec.experts_per_function, spec.layers_per_function)
        progress.update(step, description="systems", total=len(specs), completed=0)
        for spec in specs:
            task = progress.add_task(f"  {spec.label}", total=len(trace.requests))
            try:
                _check_fits(spec, assets, len(trace.tenants))
                with launched(spec, assets, trace.tenants, settings, run_dir / spec.label.replace("/", "-")) as system:
                    results.append(measure(system, trace, settings, lambda _, t=task: progress.advance(t)))
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
        model={"preset": None if settings.model_dir else settings.preset, "config": assets.model.summary()},
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
    )
    out = settings.out
    write_report_files(report, out)
    write_plots(results, out)
    trace.save(out / TRACE_FILE)
    # The table goes to stdout as Markdown text, ready to paste; progress and notes go to stderr.
    print("\n".join(markdown_table(results, failures)))
    console.print(f"wrote {out / MARKDOWN_FILE} (logs in {run_dir})")
    return out


def _check_fits(spec: SystemSpec, assets: Assets, tenants: int) -> None:
    """Refuses a run whose worst case (every server and every function resident) would exhaust memory."""
    weights = assets.weights_bytes(assets.model.num_experts, assets.model.num_layers)
    if spec.kind is SystemKind.FULL_PER_TENANT:
        needed = tenants * (weights + SERVER_OVERHEAD_BYTES)
    elif spec.kind is SystemKind.FULL_SHARED:
        needed = weights + SERVER_OVERHEAD_BYTES
    else:
        plan = assets.plan(spec.experts_per_function, spec.layers_per_function)
        functions = len(list((plan / "functions").glob("*.safetensors")))
        needed = weights + SERVER_OVERHEAD_BYTES + functions * FUNCTION_OVERHEAD_BYTES
    available = psutil.virtual_memory().available
    if needed > available:
        raise FaasmoeError(
            f"skipped: may need about {needed / 1e9:.1f} GB, {available / 1e9:.1f} GB available "
            "(fewer --layers or tenants, or more experts/layers per function)"
        )


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
