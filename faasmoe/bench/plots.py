"""PNG charts of a run: memory over time for every system, the granularity sweep and the step-time breakdown."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server

import matplotlib.pyplot as plt  # noqa: E402

from faasmoe.bench.metrics import SystemResult  # noqa: E402
from faasmoe.bench.settings import SystemKind  # noqa: E402
from faasmoe.planning.grouping import Grouping  # noqa: E402

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
BREAKDOWN_FILE = "breakdown.png"
# The parts of a decode step (means, in ms; they add up to the step's mean) and of a warm function call.
STEP_PARTS = (
    ("trunk compute", "tab:blue", lambda s: s.trunk_s),
    ("expert hand-off (in-process: expert compute)", "tab:green", lambda s: s.expert_submit_s),
    ("waiting for routed experts", "tab:red", lambda s: s.expert_wait_s),
)
CALL_PARTS = (
    ("function compute", "tab:olive", lambda s: s.call_compute_s.mean),
    ("invocation overhead", "tab:gray", lambda s: s.call_overhead_s.mean),
)
_DPI = 120
LINE_STYLES = ("-", "--", ":", "-.")  # one per elasticity mode of a faasmoe kind


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
    """Memory, CPU and latency against experts per function, one line per faasmoe mode (and elasticity).

    The baselines without granularity are drawn as horizontal lines for reference.
    """
    figure, (memory, cpu, latency) = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        (memory, "avg memory, PSS (GB)", lambda r: r.memory.avg_pss_gb),
        (cpu, "CPU-seconds", lambda r: r.cpu.cpu_s),
        (latency, "TPOT p50 (ms)", lambda r: None if r.requests.tpot_s.p50 is None else r.requests.tpot_s.p50 * 1e3),
    ]
    granularities = sorted({r.experts_per_function for r in results if SystemKind(r.kind).sweeps_granularity})
    lines = _sweep_lines(results)
    modes = list(dict.fromkeys(mode for _, mode in lines))
    for axes, label, value in panels:
        for (kind, mode), runs in lines.items():
            points = [(r.experts_per_function, value(r)) for r in runs if value(r) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                style = LINE_STYLES[modes.index(mode) % len(LINE_STYLES)]
                label = kind if mode is None else f"{kind} {mode}"
                axes.plot(xs, ys, style, marker="o", label=label, color=COLORS[kind])
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


def _sweep_lines(results: list[SystemResult]) -> dict[tuple[str, str | None], list[SystemResult]]:
    """The faasmoe runs by (kind, elasticity mode), each line's runs in granularity order."""
    lines: dict[tuple[str, str | None], list[SystemResult]] = {}
    for result in sorted(results, key=lambda r: r.experts_per_function or 0):
        if SystemKind(result.kind).sweeps_granularity:
            lines.setdefault((result.kind, _mode(result)), []).append(result)
    return lines


def _mode(result: SystemResult) -> str | None:
    """A line's elasticity mode, and its grouping when not contiguous (a popularity plan is a line of its own)."""
    e = result.elasticity
    mode = None if e is None or e.prewarm is None else f"{e.prewarm}+{e.keep_alive}"
    if result.grouping in (None, Grouping.CONTIGUOUS.value):
        return mode
    return result.grouping if mode is None else f"{mode} {result.grouping}"


def plot_breakdown(results: list[SystemResult], path: Path) -> None:
    """Stacked bars: a decode step's mean split into its parts (tick: the step's p50), and a warm call's."""
    runs = [(r.system, r.steps) for r in results if r.steps is not None]
    runs += [(f"{r.system} (saturation x{r.saturation.streams})", r.saturation.steps) for r in results if r.saturation]
    figure, (steps, calls) = plt.subplots(1, 2, figsize=(15, 2.2 + 0.45 * max(len(runs), 1)), sharey=True)
    labels = [label for label, _ in runs]
    p50 = [(label, 1e3 * figures.step_s.p50) for label, figures in runs if figures.step_s.p50 is not None]
    if p50:
        steps.scatter([v for _, v in p50], [label for label, _ in p50], marker="|", s=300, color="black", zorder=3,
                      label="step p50")  # fmt: skip
    for axes, parts in ((steps, STEP_PARTS), (calls, CALL_PARTS)):
        left = [0.0] * len(runs)
        for name, color, part in parts:
            widths = [1e3 * (part(figures) or 0.0) for _, figures in runs]
            axes.barh(labels, widths, left=left, color=color, label=name)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        axes.grid(axis="x", alpha=0.3)
        axes.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    steps.set_xlabel("decode step, mean (ms)")
    calls.set_xlabel("warm function call, mean (ms)")
    steps.invert_yaxis()  # the systems top to bottom in the report's order
    figure.suptitle("Where a decode step's time goes")
    figure.tight_layout()
    figure.savefig(path, dpi=_DPI)
    plt.close(figure)


def write_plots(results: list[SystemResult], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plot_memory(results, out / MEMORY_FILE)
    plot_sweep(results, out / SWEEP_FILE)
    plot_breakdown(results, out / BREAKDOWN_FILE)
