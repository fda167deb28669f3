"""PNG charts of a run: memory over time for every system, and the granularity sweep."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server

import matplotlib.pyplot as plt  # noqa: E402

from faasmoe.bench.metrics import SystemResult  # noqa: E402
from faasmoe.bench.settings import SystemKind  # noqa: E402

# One colour per system kind, the same on both charts.
COLORS = {
    SystemKind.FULL_PER_TENANT.value: "tab:red",
    SystemKind.FULL_SHARED.value: "tab:purple",
    SystemKind.STATIC_EXPERTS.value: "tab:gray",
    SystemKind.FAASMOE_SHARED.value: "tab:blue",
    SystemKind.FAASMOE_PRIVATE.value: "tab:orange",
}
MEMORY_FILE = "memory.png"
SWEEP_FILE = "sweep.png"
_DPI = 120


def plot_memory(results: list[SystemResult], path: Path) -> None:
    """Total PSS of each system's processes against time since the trace started."""
    figure, axes = plt.subplots(figsize=(10, 5))
    for result in results:
        if result.memory_series:
            times, gigabytes = zip(*result.memory_series, strict=True)
            style = "-" if SystemKind(result.kind).sweeps_granularity else "--"
            axes.plot(times, gigabytes, style, label=result.system, linewidth=1.4)
    axes.set_xlabel("time since the workload started (s)")
    axes.set_ylabel("memory, PSS of all processes (GB)")
    axes.set_title("Resident memory over time")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=_DPI)
    plt.close(figure)


def plot_sweep(results: list[SystemResult], path: Path) -> None:
    """Memory, CPU and latency against experts per function, one line per faasmoe mode.

    The baselines without granularity are drawn as horizontal lines for reference.
    """
    figure, (memory, cpu, latency) = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        (memory, "avg memory, PSS (GB)", lambda r: r.memory.avg_pss_gb),
        (cpu, "CPU-seconds", lambda r: r.cpu.cpu_s),
        (latency, "TPOT p50 (ms)", lambda r: None if r.requests.tpot_s.p50 is None else r.requests.tpot_s.p50 * 1e3),
    ]
    granularities = sorted({r.experts_per_function for r in results if SystemKind(r.kind).sweeps_granularity})
    for axes, label, value in panels:
        for kind in (SystemKind.FAASMOE_SHARED, SystemKind.FAASMOE_PRIVATE):
            runs = sorted((r for r in results if r.kind == kind.value), key=lambda r: r.experts_per_function or 0)
            points = [(r.experts_per_function, value(r)) for r in runs if value(r) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, marker="o", label=kind.value, color=COLORS[kind.value])
        for result in results:
            if not SystemKind(result.kind).sweeps_granularity and value(result) is not None:
                axes.axhline(
                    value(result), linestyle="--", linewidth=1.2, label=result.system, color=COLORS[result.kind]
                )
        axes.set_xscale("log")
        if granularities:
            axes.set_xticks(granularities, [str(g) for g in granularities])
            axes.minorticks_off()
        axes.set_xlabel("experts per function")
        axes.set_ylabel(label)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
    latency.legend(fontsize=8)
    figure.suptitle("Granularity sweep")
    figure.tight_layout()
    figure.savefig(path, dpi=_DPI)
    plt.close(figure)


def write_plots(results: list[SystemResult], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plot_memory(results, out / MEMORY_FILE)
    plot_sweep(results, out / SWEEP_FILE)
