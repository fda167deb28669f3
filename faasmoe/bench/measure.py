"""One measured run: the trace replayed against a running system while its processes are sampled."""

from __future__ import annotations

import time
from collections.abc import Callable

from faasmoe.bench.loadgen import LoadGenerator, RequestResult
from faasmoe.bench.metrics import (
    SystemResult,
    cost_figures,
    cpu_figures,
    function_figures,
    memory_figures,
    request_figures,
)
from faasmoe.bench.sampler import ProcessTreeSampler
from faasmoe.bench.settings import BenchSettings
from faasmoe.bench.systems import RunningSystem
from faasmoe.bench.workload import Trace

GB = 1e9
# The trace starts a moment after the samplers, so the first sample shows the system at rest.
LEAD_IN_S = 0.5


def measure(
    system: RunningSystem,
    trace: Trace,
    settings: BenchSettings,
    on_request: Callable[[RequestResult], None] | None = None,
) -> SystemResult:
    t0 = time.monotonic() + LEAD_IN_S
    sampler = ProcessTreeSampler(system.roots, settings.sample_interval, t0)
    sampler.start()
    try:
        load = LoadGenerator(trace, system.endpoints, t0, settings.request_timeout, settings.drain_timeout, on_request)
        results = load.run()
    finally:
        sampler.stop()
    samples = sampler.samples
    window = samples[-1].t - samples[0].t
    memory = memory_figures(samples)
    spec = system.spec
    return SystemResult(
        system=spec.label,
        kind=spec.kind.value,
        experts_per_function=spec.experts_per_function,
        layers_per_function=spec.layers_per_function,
        window_s=window,
        startup_s=system.startup_s,
        memory=memory,
        cpu=cpu_figures(samples),
        requests=request_figures(results, window),
        functions=function_figures(system.deployed_functions, len(sampler.function_starts), samples),
        cost=cost_figures(memory, settings.price_per_gb_s),
        memory_series=[(round(s.t, 3), round(s.total("pss") / GB, 4)) for s in samples],
        replica_series=[(round(s.t, 3), s.total("processes", "function")) for s in samples],
    )
