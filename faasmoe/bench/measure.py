"""One measured run: the trace replayed against a running system while its processes are sampled.

faasmoe-shared first has every function woken at once through the scale API, timed (faasmoe.bench.wake),
and starts the trace with them all at zero again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from faasmoe.bench.breakdown import scrape, step_figures
from faasmoe.bench.cost_model import base_memory_mib, cost_model_figures
from faasmoe.bench.elasticity import elasticity_figures
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
from faasmoe.bench.saturation import SATURATED_KINDS, saturate
from faasmoe.bench.settings import BenchSettings, SystemKind
from faasmoe.bench.systems import REAPER_FRACTION, RunningSystem
from faasmoe.bench.wake import wake_all
from faasmoe.bench.workload import Trace
from faasmoe.elastic.routing_profile import RoutingProfile
from faasmoe.planning.plan import Plan

GB = 1e9
# The trace starts a moment after the samplers, so the first sample shows the system at rest.
LEAD_IN_S = 0.5


def measure(
    system: RunningSystem,
    trace: Trace,
    settings: BenchSettings,
    on_request: Callable[[RequestResult], None] | None = None,
    profile: RoutingProfile | None = None,
) -> SystemResult:
    """With ``profile``, a faasmoe-shared run is also priced by the cost model (faasmoe/bench/cost_model.py)."""
    spec = system.spec
    wake = None
    if spec.kind is SystemKind.FAASMOE_SHARED and system.gateway_url is not None:
        names, repeats = system.function_names, settings.wake_repeats
        wake = wake_all(system.gateway_url, names, system.roots, repeats, settings.startup_timeout)
    before = scrape(system.control_urls)
    t0 = time.monotonic() + LEAD_IN_S
    sampler = ProcessTreeSampler(system.roots, settings.sample_interval, t0)
    sampler.start()
    try:
        load = LoadGenerator(trace, system.endpoints, t0, settings.request_timeout, settings.drain_timeout, on_request)
        results = load.run()
    finally:
        sampler.stop()
    after = scrape(system.control_urls)
    steps = step_figures(before, after)
    streams = settings.saturation_streams
    saturated = saturate(system, trace, settings, streams) if streams and system.spec.kind in SATURATED_KINDS else None
    samples = sampler.samples
    window = samples[-1].t - samples[0].t
    memory = memory_figures(samples)
    elasticity = None
    if spec.kind.sweeps_granularity:  # functions that scale to zero
        # Idle for longer than the keep-alive label and one reaper period: every function is at zero.
        idle_s = settings.idle_timeout * (1 + REAPER_FRACTION)
        elasticity = elasticity_figures(spec.elasticity, results, after.plus(before, sign=-1.0),
                                        sampler.function_starts, memory.function_pss_gb_s, idle_s,
                                        settings.sample_interval, wake)  # fmt: skip
    modelled, base = None, base_memory_mib(settings, wake)
    if spec.kind is SystemKind.FAASMOE_SHARED and elasticity is not None and profile is not None and base is not None:
        measured = (memory.function_pss_gb_s, len(sampler.function_starts), elasticity.prewarms.invocations)
        modelled = cost_model_figures(Plan.load(system.plan_dir), profile, settings, base, trace, results,
                                      (samples[0].t, samples[-1].t), measured)  # fmt: skip
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
        steps=steps,
        saturation=saturated,
        elasticity=elasticity,
        grouping=spec.grouping.value if spec.kind.sweeps_granularity else None,
        cost_model=modelled,
        memory_series=[(round(s.t, 3), round(s.total("pss") / GB, 4)) for s in samples],
        replica_series=[(round(s.t, 3), s.total("processes", "function")) for s in samples],
    )
