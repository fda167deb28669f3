"""The saturation run: N closed-loop streams against a warm system, for output tokens/s at full load.

Run after the trace on the systems that batch every tenant into one engine (full-shared and
faasmoe-shared), so their throughputs compare; the step breakdown and CPU-seconds come from the same window.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from faasmoe.bench.breakdown import StepFigures, scrape, step_figures
from faasmoe.bench.loadgen import ClosedLoop
from faasmoe.bench.sampler import ProcessTreeSampler
from faasmoe.bench.settings import BenchSettings, SystemKind
from faasmoe.bench.systems import RunningSystem
from faasmoe.bench.workload import Trace

SATURATED_KINDS = (SystemKind.FULL_SHARED, SystemKind.FAASMOE_SHARED)


@dataclass(frozen=True)
class SaturationFigures:
    streams: int
    window_s: float
    output_tokens: int  # streamed within the window, also by requests cut off at its end
    throughput_tok_s: float
    cpu_s_per_token: float | None  # every process of the system, over the window
    failed: int  # requests that ended in an error (their stream stopped)
    errors: list[str]  # the first few, for the report
    steps: StepFigures


def saturate(system: RunningSystem, trace: Trace, settings: BenchSettings, streams: int) -> SaturationFigures:
    """Warms the system up with one request per stream, then measures ``settings.saturation_duration`` s."""
    duration = settings.saturation_duration
    load = ClosedLoop(trace.requests, system.endpoints, streams, settings.request_timeout)
    load.warm_up()
    before = scrape(system.control_urls)
    t0 = time.monotonic()
    sampler = ProcessTreeSampler(system.roots, settings.sample_interval, t0)
    sampler.start()
    try:
        results = load.run(t0, duration)
    finally:
        sampler.stop()
    after = scrape(system.control_urls)
    tokens = sum(1 for result in results for t in result.token_times if t <= duration)
    cpu_s = sampler.samples[-1].total_cpu_s
    failed = [result.error for result in results if result.error]
    return SaturationFigures(
        streams=streams,
        window_s=duration,
        output_tokens=tokens,
        throughput_tok_s=tokens / duration,
        cpu_s_per_token=cpu_s / tokens if tokens else None,
        failed=len(failed),
        errors=sorted(set(failed))[:5],
        steps=step_figures(before, after),
    )
