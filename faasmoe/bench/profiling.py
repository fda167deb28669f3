"""The routing profile of the trace's tenants, recorded before the measured runs: what popularity plans are
grouped by and what the cost model prices every faasmoe-shared plan with.

It is recorded as in production (`faasmoe serve --routing-profile FILE`, written when the server stops;
docs/deployment-cost.md), by the full model in-process over a *profiling trace*: the same tenants (the same
prompt domains) with other arrivals and prompts (the seed + PROFILE_SEED_OFFSET), so that no plan is
grouped by the very requests it is measured on. A replayed trace (--trace) has no generator to draw another
from: its own requests are profiled, and the report says so. The requests are sent all at once, as routing
does not depend on their timing, and the profile is kept in the work directory, keyed by the model and the
profiled requests, so later runs reuse it and the popularity plans exported from it.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from faasmoe.bench.assets import Assets
from faasmoe.bench.loadgen import LoadGenerator
from faasmoe.bench.settings import BenchSettings, SystemKind
from faasmoe.bench.systems import SystemSpec, launched
from faasmoe.bench.workload import Trace, generate_trace
from faasmoe.errors import FaasmoeError
from faasmoe.planning.grouping import Grouping

# Far from any seed a user would pick: the profiling trace's arrivals and prompts are not the measured trace's.
PROFILE_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class ProfileSource:
    """Where the profile came from, for the report."""

    file: str
    trace: str  # what was profiled
    requests: int
    routed_tokens: int


def profiling_trace(trace: Trace, settings: BenchSettings, vocab_size: int) -> tuple[Trace, str]:
    """The trace to profile and what it is: another draw of the generator for the same tenants, or ``trace``
    itself when it was replayed."""
    if settings.trace is not None:
        return trace, "the replayed trace itself (its plans are grouped by the requests they are measured on)"
    seed = settings.seed + PROFILE_SEED_OFFSET
    other = generate_trace(settings.model_copy(update={"seed": seed}), vocab_size, domain_seed=settings.seed)
    tenants = f"prompt domains of seed {settings.seed}"
    return other, f"a trace of the same tenants ({tenants}) with the arrivals and prompts of seed {seed}"


def record_profile(
    assets: Assets, specs: list[SystemSpec], trace: Trace, settings: BenchSettings, log_dir: Path
) -> tuple[Assets, ProfileSource]:
    """``assets`` with the profile of ``trace``'s tenants, recorded unless the work directory has it."""
    profiled, description = profiling_trace(trace, settings, assets.model.vocab_size)
    requests = "".join(r.to_json() + "\n" for r in profiled.requests)
    key = hashlib.sha1(requests.encode()).hexdigest()[:10]
    path = settings.work_dir / "profiles" / assets.plans_dir.name / f"{key}.json"
    if not path.is_file():
        _record(path, assets, specs, profiled, settings, log_dir)
    source = ProfileSource(str(path), description, len(profiled.requests), profiled.routed_tokens)
    return replace(assets, profile=path), source


def _record(
    path: Path, assets: Assets, specs: list[SystemSpec], trace: Trace, settings: BenchSettings, log_dir: Path
) -> None:
    """Serves ``trace`` on the full model in-process and keeps the profile the server writes as it stops."""
    # Every plan computes the same routing: serve one that the runs export anyway.
    whole = SystemSpec(SystemKind.FULL_SHARED, assets.model.num_experts, assets.model.num_layers)
    first = next((s for s in specs if s.grouping is Grouping.CONTIGUOUS), whole)
    spec = SystemSpec(SystemKind.FULL_SHARED, first.experts_per_function, first.layers_per_function)
    recording = path.with_suffix(".recording")  # renamed once complete: an interrupted pass leaves no profile
    recording.parent.mkdir(parents=True, exist_ok=True)
    recording.unlink(missing_ok=True)
    at_once = Trace([replace(r, t=0.0) for r in trace.requests], trace.tenants, 0.0, trace.source, trace.params)
    with launched(spec, assets, trace.tenants, settings, log_dir, routing_profile=recording) as system:
        timeout = settings.request_timeout
        results = LoadGenerator(at_once, system.endpoints, time.monotonic(), timeout, timeout).run()
    failed = [r for r in results if not r.ok]
    if failed:
        raise FaasmoeError(f"profiling pass: {len(failed)} of {len(results)} requests failed: {failed[0].error}")
    if not recording.is_file():
        raise FaasmoeError(f"profiling pass: the server wrote no routing profile (logs in {log_dir})")
    os.replace(recording, path)
