"""faasmoe bench: its parts on their own, then one real --quick run whose report's structure is checked.

The quick run starts real servers, gateways and function processes; the benchmark stops them
itself, and the fixture kills any descendant still alive afterwards, also when the test fails.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from faasmoe.bench.assets import prepare_model
from faasmoe.bench.breakdown import Scrape, StepFigures
from faasmoe.bench.cost_model import CostModelFigures, cost_model_figures, routed_times
from faasmoe.bench.distributions import LengthDistribution
from faasmoe.bench.elasticity import (
    ColdFigures,
    ElasticityFigures,
    KeepAliveFigures,
    cold_figures,
    met_cold,
    prewarm_figures,
    split_cold,
)
from faasmoe.bench.loadgen import RequestResult, tokens_in_chunk
from faasmoe.bench.metrics import (
    FunctionFigures,
    Percentiles,
    SystemResult,
    cost_figures,
    cpu_figures,
    extrapolated,
    function_figures,
    memory_figures,
    percentile,
    request_figures,
)
from faasmoe.bench.plots import BREAKDOWN_FILE, MEMORY_FILE, SWEEP_FILE, write_plots
from faasmoe.bench.profiling import PROFILE_SEED_OFFSET, ProfileSource, profiling_trace
from faasmoe.bench.report import JSON_FILE, MARKDOWN_FILE, BenchReport, evaluate_targets, write_report
from faasmoe.bench.runner import bench_command
from faasmoe.bench.sampler import ProcessRoot, ProcessTreeSampler, RoleMemory, Sample
from faasmoe.bench.saturation import SaturationFigures
from faasmoe.bench.settings import BenchSettings, Elasticity, SystemKind
from faasmoe.bench.systems import system_specs
from faasmoe.bench.wake import WakeFigures
from faasmoe.bench.workload import Trace, TraceRequest, generate_trace, load_trace, tenant_domains
from faasmoe.elastic.routing_profile import RoutingProfile
from faasmoe.model.init_model import InitModelOptions, init_model
from faasmoe.planning.cost import CostSettings, Memory, PlanEstimate, estimate
from faasmoe.planning.grouping import Grouping
from faasmoe.planning.plan import ModelShape, Plan
from faasmoe.process import wait_until

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULT_KEYS = {"system", "kind", "memory", "cpu", "requests", "functions", "cost", "window_s", "startup_s"}


# --- workload ----------------------------------------------------------------------------------


def test_length_specs() -> None:
    assert LengthDistribution.parse("32").sample(__import__("random").Random(0)) == 32
    uniform = LengthDistribution.parse("uniform:4-8")
    assert (uniform.low, uniform.high) == (4, 8)
    assert str(LengthDistribution.parse("lognormal:48,0.5")) == "lognormal:48,0.5"
    with pytest.raises(ValueError):
        LengthDistribution.parse("gamma:1")
    with pytest.raises(ValueError):
        LengthDistribution.parse("uniform:9-3")


def test_trace_is_seeded_and_respects_idle_gaps() -> None:
    settings = BenchSettings(tenants=3, duration=40, rate=2.0, burst=5, idle=5, seed=7)
    first, again = generate_trace(settings, 512), generate_trace(settings, 512)
    assert first.requests == again.requests
    assert first.requests != generate_trace(settings.model_copy(update={"seed": 8}), 512).requests
    assert {r.tenant for r in first.requests} == {"tenant-0", "tenant-1", "tenant-2"}
    for request in first.requests:
        assert 0 <= request.t < 40
        assert request.t % 10 < 5, "no request in an idle gap (stagger 0)"
        assert all(3 <= i < 512 for i in request.prompt_ids)
    assert [r.t for r in first.requests] == sorted(r.t for r in first.requests)


def test_tenant_prompts_come_from_disjoint_seeded_domains() -> None:
    names = ["tenant-0", "tenant-1", "tenant-2"]
    domains = tenant_domains(names, None, seed=3, vocab_size=512)
    assert domains == tenant_domains(names, None, seed=3, vocab_size=512)
    assert domains != tenant_domains(names, None, seed=4, vocab_size=512)
    sets = [set(domains[t]) for t in names]
    assert all(len(ids) == (512 - 3) // 3 for ids in sets), "an equal share of the ordinary ids each"
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert all(3 <= i < 512 for ids in sets for i in ids)
    assert {len(v) for v in tenant_domains(names, 16, seed=3, vocab_size=512).values()} == {16}
    assert all(len(v) == 512 - 3 for v in tenant_domains(names, 0, seed=3, vocab_size=512).values())
    with pytest.raises(ValueError, match="domain"):
        tenant_domains(names, 200, seed=3, vocab_size=512)
    settings = BenchSettings(tenants=3, duration=20, rate=2.0, idle=0, seed=3, domain_size=16)
    trace = generate_trace(settings, 512)
    domains = tenant_domains(trace.tenants, 16, seed=3, vocab_size=512)
    assert {r.tenant for r in trace.requests} == set(names)
    assert all(set(r.prompt_ids) <= set(domains[r.tenant]) for r in trace.requests)
    assert trace.params["domain_size"] == 16
    only = trace.only("tenant-1")
    assert only.tenants == ["tenant-1"] and only.requests == [r for r in trace.requests if r.tenant == "tenant-1"]


def test_trace_round_trip_and_token_count_records(tmp_path: Path) -> None:
    trace = generate_trace(BenchSettings(tenants=2, duration=10, rate=1.0, idle=0), 512)
    trace.save(tmp_path / "trace.jsonl")
    assert load_trace(tmp_path / "trace.jsonl", seed=0, vocab_size=512).requests == trace.requests
    records = [
        {"t": 0.5, "tenant": "a", "prompt_tokens": 5, "max_tokens": 3},
        {"t": 0.1, "tenant": "b", "prompt_ids": [9, 10], "max_tokens": 2},
    ]
    (tmp_path / "counts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = load_trace(tmp_path / "counts.jsonl", seed=1, vocab_size=512)
    assert [r.tenant for r in loaded.requests] == ["b", "a"]
    assert len(loaded.requests[1].prompt_ids) == 5 and loaded.tenants == ["a", "b"]
    assert load_trace(tmp_path / "counts.jsonl", seed=1, vocab_size=512).requests == loaded.requests
    (tmp_path / "bad.jsonl").write_text('{"t": 1, "tenant": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_trace(tmp_path / "bad.jsonl", seed=0, vocab_size=512)


def test_profiling_trace_has_the_same_tenants_and_other_requests(tmp_path: Path) -> None:
    settings = BenchSettings(tenants=3, duration=30, rate=1.0, idle=0, seed=5, domain_size=16)
    trace = generate_trace(settings, 512)
    profiled, description = profiling_trace(trace, settings, 512)
    assert profiled.tenants == trace.tenants and str(5 + PROFILE_SEED_OFFSET) in description
    domains = tenant_domains(trace.tenants, 16, seed=5, vocab_size=512)
    assert all(set(r.prompt_ids) <= set(domains[r.tenant]) for r in profiled.requests), "the tenants' own domains"
    assert {r.t for r in profiled.requests}.isdisjoint({r.t for r in trace.requests}), "other arrivals"
    assert profiled.routed_tokens == sum(len(r.prompt_ids) + r.max_tokens - 1 for r in profiled.requests)
    trace.save(tmp_path / "trace.jsonl")
    replay = settings.model_copy(update={"trace": tmp_path / "trace.jsonl"})
    assert profiling_trace(trace, replay, 512)[0] is trace, "a replayed trace profiles itself"


# --- settings and systems ----------------------------------------------------------------------


def test_quick_fills_only_what_was_not_given() -> None:
    quick = BenchSettings(quick=True, tenants=3).resolved()
    assert quick.preset == "tiny" and quick.tenants == 3
    assert BenchSettings().resolved().preset == "qwen1.5-bench"
    command = bench_command(BenchSettings(quick=True, tenants=3, idle=0, experts_per_function="4,1", progress=False))
    assert command == "faasmoe bench --experts-per-function 1,4 --tenants 3 --idle 0.0 --quick --no-progress"


def test_system_specs_sweep_granularity() -> None:
    settings = BenchSettings(experts_per_function=[1, 4, 100], layers_per_function=1)
    specs = system_specs(settings, num_experts=12, num_layers=2)
    assert (specs[0].experts_per_function, specs[0].layers_per_function) == (12, 2)
    labels = [s.label for s in specs]
    shared = [f"faasmoe-shared/e{n}/{mode}" for n in (1, 4, 12) for mode in ("off+fixed", "predicted+fixed",
                                                                              "predicted+adaptive")]  # fmt: skip
    private = ["faasmoe-private/e1", "faasmoe-private/e4", "faasmoe-private/e12"]
    assert labels == ["full-per-tenant", "full-shared", "static-experts", *shared, *private]
    assert all(str(s.elasticity) == "predicted+adaptive" for s in specs if s.kind is SystemKind.FAASMOE_PRIVATE)
    assert BenchSettings(systems="full-shared,faasmoe-shared").systems == [
        SystemKind.FULL_SHARED,
        SystemKind.FAASMOE_SHARED,
    ]


def test_groupings_label_faasmoe_shared_runs() -> None:
    assert BenchSettings().grouping == [Grouping.CONTIGUOUS]
    settings = BenchSettings(grouping="contiguous, popularity,contiguous", elasticity="predicted+adaptive",
                             systems="faasmoe-shared,faasmoe-private", experts_per_function=[4])  # fmt: skip
    assert settings.grouping == [Grouping.CONTIGUOUS, Grouping.POPULARITY]
    labels = [s.label for s in system_specs(settings, num_experts=12, num_layers=2)]
    assert labels == ["faasmoe-shared/e4/predicted+adaptive", "faasmoe-shared/e4/popularity/predicted+adaptive",
                      "faasmoe-private/e4"]  # fmt: skip
    with pytest.raises(ValueError, match="grouping"):
        BenchSettings(grouping="random")
    command = bench_command(BenchSettings(grouping="contiguous,popularity", base_memory_mib=64))
    assert command == "faasmoe bench --grouping contiguous,popularity --base-memory-mib 64"


def test_the_model_is_read_by_its_family(tmp_path: Path) -> None:
    path = init_model(tmp_path / "deepseek", InitModelOptions("deepseek-tiny", dtype="float32"))
    config = json.loads((path / "config.json").read_text())
    assert "num_experts" not in config, "deepseek_v3 calls them n_routed_experts"
    model = prepare_model(BenchSettings(model_dir=path, work_dir=tmp_path / "work"), tmp_path / "log").model
    assert (model.num_experts, model.num_layers) == (16, 3)
    assert model.moe_layers == [1, 2], "a dense first layer"


def test_elasticity_modes() -> None:
    settings = BenchSettings(elasticity="off+fixed, all+adaptive,off+fixed")
    assert [str(mode) for mode in settings.elasticity] == ["off+fixed", "all+adaptive"]
    assert settings.model_dump(mode="json")["elasticity"] == ["off+fixed", "all+adaptive"]
    assert BenchSettings(quick=True).resolved().elasticity == [Elasticity.parse("predicted+adaptive")]
    for bad in ("predicted", "on+fixed", "off+forever"):
        with pytest.raises(ValueError, match="PREWARM"):
            BenchSettings(elasticity=bad)
    command = bench_command(BenchSettings(elasticity="off+fixed,predicted+adaptive", full_per_tenant="one"))
    assert command == "faasmoe bench --elasticity off+fixed,predicted+adaptive --full-per-tenant one"


# --- measurement -------------------------------------------------------------------------------


# A second of CPU, not of wall time: on a loaded machine the child gets less than its share of a core.
CHILD = "import time; x = bytearray(50_000_000)\nwhile time.process_time() < 1.0: pass\ntime.sleep(5)"
PARENT = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {CHILD!r}]); time.sleep(30)"


def test_sampler_finds_descendants_and_counts_their_cpu() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], start_new_session=True)
    try:
        sampler = ProcessTreeSampler([ProcessRoot(parent.pid, "gateway", "function")], interval_s=0.2)
        sampler.start()
        # The child's second of busy CPU, seen by the sampler (which then also saw its 50 MB).
        burnt = wait_until(lambda: bool(sampler.samples) and sampler.samples[-1].cpu_s.get("function", 0) > 0.5, 30)
        sampler.stop()
        assert burnt, sampler.samples[-1:]
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
    last = sampler.samples[-1]
    assert last.role("function").processes == 1 and last.role("gateway").processes == 1
    assert last.role("function").anon > 50_000_000
    assert last.cpu_s["function"] > 0.5
    assert len(sampler.function_starts) == 1


def test_figures_from_samples_and_results() -> None:
    samples = [
        Sample(0.0, {"control": RoleMemory(pss=1_000_000_000, anon=800_000_000, processes=1)}, {"control": 0.0}),
        Sample(
            2.0,
            {"control": RoleMemory(pss=1_000_000_000), "function": RoleMemory(pss=2_000_000_000, processes=2)},
            {"control": 1.0, "function": 3.0},
        ),
    ]
    memory = memory_figures(samples)
    assert memory.avg_pss_gb == pytest.approx(2.0) and memory.peak_pss_gb == pytest.approx(3.0)
    assert memory.function_pss_gb_s == pytest.approx(2.0)
    cpu = cpu_figures(samples)
    assert cpu.cpu_s == pytest.approx(4.0) and cpu.avg_cpu_pct == pytest.approx(200.0)
    assert cost_figures(memory, 0.5).function_usd == pytest.approx(1.0)
    result = RequestResult("a", 0.0, 1.0, 5, 3, token_times=[1.5, 1.7, 1.9], end_t=2.0)
    figures = request_figures([result, RequestResult("a", 0, 1, 5, 3, end_t=2, error="HTTP 500")], window_s=2.0)
    assert figures.completed == 1 and figures.failed == 1 and figures.output_tokens == 3
    assert figures.ttft_s.p50 == pytest.approx(0.5) and figures.tpot_s.p50 == pytest.approx(0.2)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    functions = function_figures(4, 2, samples)
    assert functions.avg_replicas == pytest.approx(1.0) and functions.peak_replicas == 2
    assert function_figures(0, 0, samples).avg_replicas is None


def request(sent: float, first: float, end: float, error: str | None = None) -> RequestResult:
    return RequestResult("tenant-0", sent, sent, 8, 2, token_times=[first, end], end_t=end, error=error)


def test_cold_requests_follow_idle_and_warm_ones_follow_their_first_token() -> None:
    results = [
        request(0.0, 3.0, 4.0),  # cold: nothing before it
        request(1.0, 3.1, 5.0),  # behind the cold start: neither
        request(4.0, 4.1, 6.0),  # warm
        request(7.0, 7.2, 8.0),  # warm: idle 1 s only
        request(30.0, 32.0, 33.0),  # cold: idle 22 s
        request(40.0, 40.1, 40.5, error="HTTP 500"),  # failed: neither, but busy until 40.5
        request(50.0, 50.2, 51.0),  # idle 9.5 s since the failed one: warm
    ]
    cold, warm = split_cold(results, idle_s=10.0)
    assert [r.sent_t for r in cold] == [0.0, 30.0]
    assert [r.sent_t for r in warm] == [4.0, 7.0, 50.0]
    wake = WakeFigures.of(4, [1.0, 2.0, 1.5])
    figures = cold_figures(results, 10.0, wake)
    assert (figures.cold_requests, figures.warm_requests, figures.behind_cold) == (2, 3, 1)
    assert figures.cold_ttft_p99_s == pytest.approx(percentile([2.0, 3.0], 99))
    assert figures.warm_ttft_p99_s == pytest.approx(percentile([0.1, 0.2, 0.2], 99))
    assert figures.penalty_vs_wake == pytest.approx(figures.penalty_s / 1.5)
    assert cold_figures(results, 10.0, None).penalty_vs_wake is None
    # Replicas first seen at 0.4 s (started while only the first was in flight), 4.2 s (started in the
    # half second before: the first three were in flight) and 30.3 s (the fifth).
    assert met_cold(results, [0.4], interval_s=0.5) == 1
    assert met_cold(results, [4.2], interval_s=0.5) == 3
    assert met_cold(results, [0.4, 4.2, 30.3], interval_s=0.5) == 4


PREWARM_METRICS = """# TYPE faasmoe_function_invocations_total counter
faasmoe_function_invocations_total{{function="a"}} {a}
faasmoe_function_invocations_total{{function="b"}} {b}
# TYPE faasmoe_function_cold_starts_total counter
faasmoe_function_cold_starts_total{{function="a"}} {fresh}
# TYPE faasmoe_prewarm_calls_total counter
faasmoe_prewarm_calls_total{{function="a",outcome="scaled"}} {scaled}
faasmoe_prewarm_calls_total{{function="b",outcome="already_up"}} 2
faasmoe_prewarm_calls_total{{function="b",outcome="failed"}} 1
# TYPE faasmoe_lookahead_predicted_slots_total counter
faasmoe_lookahead_predicted_slots_total {scaled}0
# TYPE faasmoe_lookahead_correct_slots_total counter
faasmoe_lookahead_correct_slots_total {fresh}0
"""


def test_prewarm_hits_misses_and_waste_from_metrics() -> None:
    before = Scrape.parse(PREWARM_METRICS.format(a=5, b=5, fresh=1, scaled=1))
    after = Scrape.parse(PREWARM_METRICS.format(a=25, b=15, fresh=4, scaled=5))
    window = after.plus(before, sign=-1.0)
    assert window.counter("faasmoe_prewarm_calls", outcome="scaled") == 4
    # 6 replicas started: 4 woken by prewarms, so 2 invocations met their function at zero; 3 replicas
    # met their first invocation, so 3 were started and never used.
    figures = prewarm_figures(window, replica_starts=6)
    assert (figures.invocations, figures.wakes, figures.misses, figures.wasted) == (30, 4, 2, 3)
    assert figures.hit_rate == pytest.approx(1 - 2 / 30)
    assert (figures.already_up, figures.failed_wakes) == (0, 0), "those counters did not move in the window"
    assert figures.lookahead_slot_accuracy == pytest.approx(30 / 40) and figures.lookahead_foreseen is None
    assert prewarm_figures(Scrape(), replica_starts=0).hit_rate is None


def test_stream_chunks_count_tokens() -> None:
    assert tokens_in_chunk({"choices": [{"text": "ab", "token_ids": [4, 5]}]}) == 2
    assert tokens_in_chunk({"choices": [{"text": "a"}]}) == 1
    assert tokens_in_chunk({"choices": [{"text": "", "finish_reason": "length"}]}) == 0


# --- report ------------------------------------------------------------------------------------


def fake_steps(step_s: float, calls: bool) -> StepFigures:
    call = Percentiles(0.004, 0.006, 0.0045) if calls else Percentiles(None, None, None)
    overhead = Percentiles(0.0003, 0.002, 0.0005) if calls else Percentiles(None, None, None)
    wait = 0.4 * step_s if calls else 0.0
    return StepFigures(20, Percentiles(step_s, 2 * step_s, step_s), 0.5 * step_s, 0.5 * step_s - wait, wait,
                       4.0 if calls else None, call, overhead)  # fmt: skip


def fake_saturation(tok_s: float, cpu_s_per_token: float, calls: bool) -> SaturationFigures:
    return SaturationFigures(4, 10.0, int(tok_s * 10), tok_s, cpu_s_per_token, 0, [], fake_steps(0.03, calls))


def fake_result(label: str, kind: SystemKind, pss_gb: float, cpu_s: float, tpot: float, epf: int | None = None):
    samples = [
        Sample(t, {"control": RoleMemory(pss=int(pss_gb * 1e9), processes=1)}, {"control": cpu_s * t / 10})
        for t in (0.0, 5.0, 10.0)
    ]
    memory = memory_figures(samples)
    timing = RequestResult("tenant-0", 0, 0, 4, 3, token_times=[0.1, 0.1 + tpot, 0.1 + 2 * tpot], end_t=1)
    return SystemResult(
        system=label,
        kind=kind.value,
        experts_per_function=epf or 12,
        layers_per_function=1 if epf else 2,
        window_s=10.0,
        startup_s=1.0,
        memory=memory,
        cpu=cpu_figures(samples),
        requests=request_figures([timing], 10.0),
        functions=function_figures(0, 0, []),
        cost=cost_figures(memory, 1e-5),
        steps=fake_steps(tpot, calls=epf is not None),
        memory_series=[(s.t, s.total("pss") / 1e9) for s in samples],
    )


def test_report_targets_tables_and_plots(tmp_path: Path) -> None:
    results = [
        fake_result("full-per-tenant", SystemKind.FULL_PER_TENANT, 10.0, 100.0, 0.05),
        fake_result("full-shared", SystemKind.FULL_SHARED, 2.0, 30.0, 0.05),
        fake_result("static-experts", SystemKind.STATIC_EXPERTS, 2.5, 30.0, 0.06),
        fake_result("faasmoe-shared/e4", SystemKind.FAASMOE_SHARED, 1.5, 20.0, 0.06, epf=4),
        fake_result("faasmoe-shared/e12", SystemKind.FAASMOE_SHARED, 3.0, 20.0, 0.07, epf=12),
    ]
    results[1].saturation = fake_saturation(100.0, 0.05, calls=False)
    results[3].saturation = fake_saturation(80.0, 0.06, calls=True)
    targets = evaluate_targets(results)
    by = {(t.target, t.system): t for t in targets}
    assert by[("saturation tok/s vs full-shared (>=)", "faasmoe-shared/e4")].value == pytest.approx(0.8)
    assert by[("saturation tok/s vs full-shared (>=)", "faasmoe-shared/e4")].met is False
    assert by[("saturation CPU-s/token vs full-shared", "faasmoe-shared/e4")].value == pytest.approx(1.2)
    assert by[("call overhead p50 ms (trace)", "faasmoe-shared/e4")].value == pytest.approx(0.3)
    assert by[("call overhead p50 ms (trace)", "faasmoe-shared/e4")].met is True
    assert ("saturation tok/s vs full-shared (>=)", "faasmoe-shared/e12") not in by
    assert by[("avg memory vs full-per-tenant", "faasmoe-shared/e4")].value == pytest.approx(0.15)
    assert by[("avg memory vs full-per-tenant", "faasmoe-shared/e4")].met is True
    assert by[("avg memory vs static-experts (< 1)", "faasmoe-shared/e12")].met is False
    assert by[("TPOT p50 vs full-shared", "faasmoe-shared/e4")].value == pytest.approx(1.2)
    report = BenchReport("faasmoe bench", "a machine", {}, {"config": {}}, {"tenants": 1}, results, [], targets)
    write_report(report, tmp_path)
    write_plots(results, tmp_path)
    check_report_files(tmp_path, [r.system for r in results], saturated=["full-shared", "faasmoe-shared/e4"])
    rows = breakdown_rows(tmp_path)
    # faasmoe-shared/e4's trace row: step p50 / mean, trunk, hand-off, wait, calls, compute, overhead p50 / p99.
    assert rows[("faasmoe-shared/e4", "trace")][2:10] == ["20", "60.0 / 60.0", "30.0", "6.0", "24.0", "4.0", "4.00",
                                                           "0.30 / 2.00"]  # fmt: skip
    assert rows[("full-shared", "trace")][6:10] == ["0.0", "-", "-", "-"]
    assert rows[("full-shared", "saturation, 4 streams")][10:] == ["100.0", "0.050"]


def section_rows(out: Path, heading: str) -> list[list[str]]:
    """The table under ``## heading`` in bench.md: its rows' cells, header left out."""
    section = (out / MARKDOWN_FILE).read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()]
    return [row for row in rows if len(row) > 2 and row[0] not in ("system", "---")]


def breakdown_rows(out: Path) -> dict[tuple[str, str], list[str]]:
    """The step-time breakdown table of bench.md, its cells by (system, run)."""
    return {(row[0], row[1]): row for row in section_rows(out, "Step-time breakdown")}


def fake_elasticity(prewarm: str, keep_alive: str, met: int, gb_s: float, penalty_s: float) -> ElasticityFigures:
    wake = WakeFigures.of(6, [2.0])
    cold = ColdFigures(12.5, 3, 20, 2, 1.0 + penalty_s, 1.0, penalty_s, wake, penalty_s / 2.0)
    prewarms = prewarm_figures(Scrape(), replica_starts=0)
    return ElasticityFigures(prewarm, keep_alive, cold, prewarms, KeepAliveFigures(30, met, gb_s, 0))


def test_report_elasticity_sections_and_extrapolation(tmp_path: Path) -> None:
    one_copy = fake_result("full-per-tenant", SystemKind.FULL_PER_TENANT, 2.0, 10.0, 0.05)
    one_copy.weights_gb = 1.5
    full = extrapolated(one_copy, 3, "tenant-0")
    assert full.memory.avg_pss_gb == pytest.approx(6.0) and full.cpu.cpu_s == pytest.approx(30.0)
    assert full.weights_gb == pytest.approx(4.5) and full.requests == one_copy.requests
    shared = fake_result("full-shared", SystemKind.FULL_SHARED, 2.0, 10.0, 0.05)
    shared.weights_gb = 1.5
    runs = []
    for mode, met, gb_s in (("off+fixed", 9, 40.0), ("predicted+fixed", 6, 40.0), ("predicted+adaptive", 6, 25.0)):
        run = fake_result(f"faasmoe-shared/e4/{mode}", SystemKind.FAASMOE_SHARED, 1.0, 10.0, 0.06, epf=4)
        run.elasticity = fake_elasticity(*mode.split("+"), met, gb_s, penalty_s=3.0)
        runs.append(run)
    results = [full, shared, *runs]
    targets = evaluate_targets(results)
    by = {(t.target, t.system): t for t in targets}
    assert by[("avg memory vs full-shared", runs[0].system)].value == pytest.approx(0.5)
    assert by[("avg memory vs full-per-tenant", runs[0].system)].value == pytest.approx(1 / 6)
    assert by[("cold - warm TTFT p99 vs wake all", runs[0].system)].value == pytest.approx(1.5)
    assert by[("cold - warm TTFT p99 vs wake all", runs[0].system)].met is False
    report = BenchReport("faasmoe bench", "a machine", {}, {"config": {}}, {"tenants": 3}, results, [], targets)
    write_report(report, tmp_path)
    write_plots(results, tmp_path)
    payload = check_report_files(tmp_path, [r.system for r in results])
    assert payload["results"][0]["extrapolated"] == {"copies": 3, "measured_tenant": "tenant-0"}
    assert payload["results"][1]["extrapolated"] is None
    memory = {row[0]: row for row in section_rows(tmp_path, "Memory against weights")}
    assert memory["full-per-tenant (extrapolated: 1 copy x3)"][1:3] == ["4.5", "6.00"]
    assert memory[runs[0].system][5:] == ["0.167", "0.500"]
    # The step breakdown is the one copy's: its CPU-seconds per token too (10 CPU-s for 3 tokens).
    assert breakdown_rows(tmp_path)[("full-per-tenant", "trace")][-1] == "3.333"
    cold = {row[0]: row for row in section_rows(tmp_path, "Cold starts after idle")}
    assert cold[runs[0].system][1:] == ["> 12.5", "3 / 20", "4.00", "1.00", "3.00", "2.00 (6, 1)", "1.50", "**no**"]
    assert {row[0] for row in section_rows(tmp_path, "Prewarm: hit rate and waste")} == {r.system for r in runs}
    keep = {row[0]: row for row in section_rows(tmp_path, "Keep-alive: adaptive against fixed")}
    assert keep[runs[2].system][-1] == "+0 met cold, -15.0 GB-s: Pareto yes"
    assert keep[runs[0].system][-1] == keep[runs[1].system][-1] == "-"


def small_plan(experts_per_function: int) -> tuple[Plan, RoutingProfile]:
    """A 2-layer, 8-expert plan with 1 MB per expert, and a profile of two tenants with their own hot experts."""
    shape = ModelShape(model_type="qwen2_moe", num_hidden_layers=2, hidden_size=16, moe_intermediate_size=8,
                       num_experts=8, num_experts_per_tok=2, dtype="float32", moe_layers=[0, 1])  # fmt: skip
    plan = Plan.group(shape, experts_per_function)
    for function in plan.functions:
        function.bytes = len(function.experts) * 1_000_000
    hot = [[[100.0 / (e + 1) for e in range(8)]] * 2, [[100.0 / (8 - e) for e in range(8)]] * 2]
    profile = RoutingProfile(model="bench", moe_layers=[0, 1], num_experts=8, half_life_s=600.0, decayed_to=0.0,
                             tenants={"tenant-0": hot[0], "tenant-1": hot[1]})  # fmt: skip
    return plan, profile


def test_cost_model_follows_the_load_of_the_last_keep_alive() -> None:
    plan, profile = small_plan(2)
    settings = BenchSettings(idle_timeout=4.0, sample_interval=0.5, base_memory_mib=10)
    keep_alive = 4.0 * 1.125  # the label and half a reaper period
    prompt = RequestResult("tenant-1", 0, 0, 3, 3, token_times=[1.0, 1.2, 1.4])
    # The prompt by the step of the first token, each output token but the last by the step of the next.
    assert routed_times([prompt]) == [1.0, 1.0, 1.0, 1.2, 1.4]
    # One token routed every K seconds, from 0.25 s to 40.75 s: every trailing K until 45.25 s holds exactly one.
    times = [0.25 + keep_alive * i for i in range(10)]
    results = [RequestResult("tenant-0", 0, 0, 1, 10, token_times=times)]
    assert routed_times(results) == times
    trace = Trace([TraceRequest(0.0, "tenant-0", [5], 10)], ["tenant-0"], 45.0, "generated")  # 10 routed in 45 s
    measured = (3.0, 4, 1000)  # function GB-s, replica starts, invocations

    def figures(end: float) -> CostModelFigures:
        return cost_model_figures(plan, profile, settings, 10, trace, results, (keep_alive, end), measured)

    cost = CostSettings(zero_duration="4500ms", base_memory_mib=10, memory=Memory.RESIDENT)  # what the bench measures
    sparse = estimate(plan, profile, cost.model_copy(update={"tokens_per_second": 1 / keep_alive}))
    assert 1 < sparse.warm_functions < len(plan.functions) - 1, "a load at which the warm share is not saturated"
    busy = figures(45.0)
    assert busy.modelled_gb_s == pytest.approx(sparse.gb_s_per_hour / 3600 * (45.0 - keep_alive))
    assert busy.modelled_replicas == pytest.approx(sparse.warm_functions)
    assert figures(60.0).modelled_gb_s == pytest.approx(busy.modelled_gb_s), "nothing warm after the last K"
    # A cold start costs the plan's 16 MB of experts held for a second; steady is at the trace's mean load.
    price = busy.price_per_cold_start
    assert price == pytest.approx(1.0 * 0.016 * settings.price_per_gb_s)
    assert busy.measured_usd == pytest.approx(3.0 * settings.price_per_gb_s + 4 * price + 1000 * 2e-7)
    mean_load = cost.model_copy(update={"tokens_per_second": 10 / 45.0, "price_per_cold_start": price})
    assert busy.steady == estimate(plan, profile, mean_load)


def fake_planned(label: str, epf: int, grouping: str, gb_s: float, colds: int, modelled: float,
                 per_hour: float, usd: float) -> SystemResult:  # fmt: skip
    run = fake_result(label, SystemKind.FAASMOE_SHARED, 1.0, 10.0, 0.06, epf=epf)
    run.grouping, run.functions = grouping, FunctionFigures(24 // epf, colds, 2.0, 4)
    run.elasticity = fake_elasticity("predicted", "adaptive", 3, gb_s, penalty_s=1.0)
    steady = PlanEstimate(given=False, grouping=Grouping(grouping), experts_per_function=epf, layers_per_function=1,
                          functions=24 // epf, fits_ce=True, warm_functions=1.5, gb_s_per_hour=1.0,
                          cold_starts_per_hour=1.0, invocations_per_hour=1.0, invocations_per_token=1.0,
                          cost_per_hour=per_hour)  # fmt: skip
    run.cost_model = CostModelFigures(16.875, 40, 1e-4, modelled, 1.5, usd, steady)
    return run


def test_report_cost_aware_plans(tmp_path: Path) -> None:
    runs = [  # 1 request each: cold starts per request = replica starts
        fake_planned("faasmoe-shared/e4/predicted+adaptive", 4, "contiguous", 40.0, 6, 44.0, 0.03, 0.0020),
        fake_planned("faasmoe-shared/e4/popularity/predicted+adaptive", 4, "popularity", 28.0, 5, 40.0, 0.02, 0.0015),
        fake_planned("faasmoe-shared/e12/predicted+adaptive", 12, "contiguous", 30.0, 2, 30.0, 0.05, 0.0010),
        fake_planned("faasmoe-shared/e12/popularity/predicted+adaptive", 12, "popularity", 27.0, 3, 27.0, 0.04, 0.0012),
    ]
    shared = fake_result("full-shared", SystemKind.FULL_SHARED, 2.0, 10.0, 0.05)
    results = [shared, *runs]
    by = {(t.target, t.system): t for t in evaluate_targets(results)}
    error = "cost model error: abs(modelled / measured - 1), function GB-s"
    assert by[(error, runs[0].system)].value == pytest.approx(0.1) and by[(error, runs[0].system)].met is True
    assert by[(error, runs[1].system)].value == pytest.approx(12 / 28) and by[(error, runs[1].system)].met is False
    ratio, colder = "function GB-s popularity / contiguous", "cold starts / request popularity - contiguous"
    assert by[(ratio, runs[1].system)].value == pytest.approx(0.7) and by[(ratio, runs[1].system)].met is True
    assert by[(colder, runs[1].system)].value == pytest.approx(-1.0) and by[(colder, runs[1].system)].met is True
    assert by[(ratio, runs[3].system)].value == pytest.approx(0.9) and by[(ratio, runs[3].system)].met is False
    assert by[(colder, runs[3].system)].met is False and (ratio, runs[0].system) not in by
    # auto picks the cheapest modelled (e4 popularity, $0.02/h), the 3rd cheapest measured of the 4.
    auto = by[("auto's pick: rank by measured $ of 4 plans (predicted+adaptive)", runs[1].system)]
    assert (auto.value, auto.met) == (3, True)
    profile = ProfileSource("profile.json", "a trace of the same tenants", 8, 146)
    model = {"preset": "tiny", "router_skew": 1.0, "moe_layers": 2, "config": {}}
    report = BenchReport("faasmoe bench", "a machine", {}, model, {"tenants": 2}, results, [], [], profile)
    write_report(report, tmp_path)
    text = (tmp_path / MARKDOWN_FILE).read_text()
    assert "Model: tiny (router skew 1 (Zipf); 2 MoE layers; )" in text and "a trace of the same tenants" in text
    rows = section_rows(tmp_path, "Cost-aware plans")
    table = {row[0]: row for row in rows if row[1] in ("contiguous", "popularity")}
    assert table[runs[1].system][1:] == ["popularity", "6", "28.0", "5.00", "40", "40.0", "1.43", "2.0 / 1.5",
                                         "0.00150", "0.0200"]  # fmt: skip
    pairs = {row[0]: row for row in rows if row[1].startswith("faasmoe-shared/")}
    assert pairs[runs[3].system][1:] == [runs[2].system, "2", "0.900", "1.00", "0.900"]
    picks = [row for row in rows if row[0] == "predicted+adaptive"]
    assert picks == [["predicted+adaptive", "4", runs[1].system, "0.0200", "3", runs[2].system]]
    payload = json.loads((tmp_path / JSON_FILE).read_text())
    assert payload["results"][2]["cost_model"]["steady"]["cost_per_hour"] == 0.02
    assert payload["profile"]["routed_tokens"] == 146


def check_report_files(out: Path, systems: list[str], saturated: list[str] = ()) -> dict:
    payload = json.loads((out / JSON_FILE).read_text())
    assert [r["system"] for r in payload["results"]] == systems
    for result in payload["results"]:
        assert RESULT_KEYS <= set(result)
        assert {"avg_pss_gb", "peak_pss_gb", "avg_anon_gb", "avg_file_gb", "pss_gb_s"} <= set(result["memory"])
        assert {"ttft_s", "tpot_s", "e2e_s", "throughput_tok_s"} <= set(result["requests"])
        assert {"p50", "p99"} <= set(result["requests"]["ttft_s"])
    main = (out / MARKDOWN_FILE).read_text().split("## ", 1)[0]
    table = [line for line in main.splitlines() if line.startswith("| ")]
    for system in systems:
        assert sum(line.startswith((f"| {system} |", f"| {system} (extrapolated")) for line in table) == 1, system
    runs = sorted(breakdown_rows(out))
    assert runs == sorted([(s, "trace") for s in systems] + [(s, "saturation, 4 streams") for s in saturated])
    for name in (MEMORY_FILE, SWEEP_FILE, BREAKDOWN_FILE):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    return payload


def test_percentiles_of_nothing() -> None:
    assert Percentiles.of([]) == Percentiles(None, None, None)


# --- the real thing ----------------------------------------------------------------------------


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """Kills whatever the benchmark left running below this test process, and fails the test if it did."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for process in leftovers:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftovers, timeout=10)
    assert not leftovers, f"the benchmark left processes running: {leftovers}"


@pytest.mark.timeout(600)
def test_quick_run_writes_a_complete_report(tmp_path: Path, no_leftovers: None) -> None:
    from typer.testing import CliRunner

    from faasmoe.cli import app

    out, work = tmp_path / "results", tmp_path / "work"
    saturation = ["--saturation-streams", "4", "--saturation-duration", "2"]  # a tiny one: seconds
    args = ["bench", "--quick", "--out", str(out), "--work-dir", str(work), "--no-progress", *saturation]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    shared_run = "faasmoe-shared/e6/predicted+adaptive"  # --quick runs one elasticity mode
    systems = ["full-per-tenant", "full-shared", "static-experts", shared_run, "faasmoe-private/e6"]
    payload = check_report_files(out, systems, saturated=["full-shared", shared_run])
    assert not payload["failures"], payload["failures"]
    expected = f"faasmoe bench --saturation-streams 4 --saturation-duration 2.0 --out {out} --work-dir {work} --quick"
    assert payload["command"] == expected + " --no-progress"
    results = {r["system"]: r for r in payload["results"]}
    for result in results.values():
        assert result["requests"]["completed"] == result["requests"]["requests"] > 0, result["requests"]["errors"]
        assert result["memory"]["avg_pss_gb"] > 0 and result["cpu"]["cpu_s"] > 0
        assert result["requests"]["tpot_s"]["p50"] > 0 and result["requests"]["throughput_tok_s"] > 0
    # Robust whatever the machine: two full-model servers hold more than one; 2 layers x 12/6 functions
    # start at zero replicas, so serving cold-starts some of them; the static function is always on.
    assert results["full-per-tenant"]["memory"]["avg_pss_gb"] > results["full-shared"]["memory"]["avg_pss_gb"]
    shared = results[shared_run]["functions"]
    assert shared["deployed"] == 4 and shared["cold_starts"] >= 1
    assert results["static-experts"]["functions"]["cold_starts"] == 0
    # The step breakdown: every system decoded; only systems with functions waited for them and called them.
    for name, result in results.items():
        steps = result["steps"]
        assert steps["decode_steps"] > 0 and steps["step_s"]["p50"] > 0, name
        assert steps["trunk_s"] > 0 and steps["expert_submit_s"] > 0, name
        parts = steps["trunk_s"] + steps["expert_submit_s"] + steps["expert_wait_s"]
        assert parts == pytest.approx(steps["step_s"]["mean"], rel=1e-6), name
        called = steps["calls_per_step"] is not None
        assert called == (name not in ("full-per-tenant", "full-shared")), name
        if called:
            assert steps["expert_wait_s"] > 0 and steps["call_overhead_s"]["p50"] > 0, name
    for name in ("full-shared", shared_run):
        saturated = results[name]["saturation"]
        assert saturated["streams"] == 4 and saturated["failed"] == 0, saturated["errors"]
        assert saturated["output_tokens"] > 0 and saturated["cpu_s_per_token"] > 0
        assert saturated["steps"]["decode_steps"] > 0
    assert results["static-experts"]["saturation"] is None
    # The model is stated; every system's weights sit next to its PSS (2 full models for 2 tenants).
    assert payload["model"]["moe_layers"] == 2 and "2 MoE layers" in (out / MARKDOWN_FILE).read_text()
    weights = {name: result["weights_gb"] for name, result in results.items()}
    assert weights["full-per-tenant"] == pytest.approx(2 * weights["full-shared"]) and weights["full-shared"] > 0
    assert {row[0] for row in section_rows(out, "Memory against weights")} == set(systems)
    assert all(result["extrapolated"] is None for result in results.values()), "2 tiny models fit"
    # The elasticity figures of the systems whose functions scale to zero, finite (their values vary).
    for name in (shared_run, "faasmoe-private/e6"):
        elastic = results[name]["elasticity"]
        assert (elastic["prewarm"], elastic["keep_alive"]) == ("predicted", "adaptive"), name
        cold, prewarms, keep = elastic["cold"], elastic["prewarms"], elastic["keep_alive_cost"]
        assert cold["cold_requests"] >= 1, "the trace starts with every function at zero"
        assert cold["cold_requests"] + cold["warm_requests"] + cold["behind_cold"] == len(payload_requests(out))
        assert math.isfinite(cold["cold_ttft_p99_s"]) and cold["cold_ttft_p99_s"] > 0, name
        # Requests keep arriving for seconds after the first token of the cold first one.
        assert cold["warm_requests"] >= 1 and math.isfinite(cold["warm_ttft_p99_s"]), name
        assert prewarms["invocations"] > 0 and 0 <= prewarms["hit_rate"] <= 1, name
        assert prewarms["replica_starts"] == results[name]["functions"]["cold_starts"] >= 1, name
        assert prewarms["misses"] >= 0 and prewarms["wasted"] >= 0, name
        assert 0 <= prewarms["lookahead_slot_accuracy"] <= 1 and 0 <= prewarms["lookahead_foreseen"] <= 1, name
        assert keep["requests"] == len(payload_requests(out)) and keep["met_cold"] >= 1, name
        assert math.isfinite(keep["function_gb_s"]) and keep["function_gb_s"] > 0, name
    wake = results[shared_run]["elasticity"]["cold"]["wake"]
    assert wake["error"] is None and wake["functions"] == 4 and len(wake["runs_s"]) == 1
    assert math.isfinite(wake["median_s"]) and wake["median_s"] > 0
    assert math.isfinite(results[shared_run]["elasticity"]["cold"]["penalty_vs_wake"])
    assert results["faasmoe-private/e6"]["elasticity"]["cold"]["wake"] is None, "faasmoe-shared only"
    for heading in ("Cold starts after idle", "Prewarm: hit rate and waste", "Keep-alive: adaptive against fixed"):
        assert {row[0] for row in section_rows(out, heading)} == {shared_run, "faasmoe-private/e6"}, heading
    # The cost model prices the faasmoe-shared run, with the routing profile of the profiling pass.
    assert payload["profile"]["requests"] > 0 and Path(payload["profile"]["file"]).is_file()
    modelled = results[shared_run]["cost_model"]
    assert modelled["base_memory_mib"] > 0 and modelled["modelled_gb_s"] > 0 and modelled["steady"]["functions"] == 4
    assert results["faasmoe-private/e6"]["cost_model"] is None
    assert [row[0] for row in section_rows(out, "Cost-aware plans") if row[1] == "contiguous"] == [shared_run]
    targets = {(t["target"], t["system"]) for t in payload["targets"]}
    assert {("avg memory vs full-shared", shared_run), ("cold - warm TTFT p99 vs wake all", shared_run)} <= targets
    assert len(payload_requests(out)) == payload["trace"]["requests"]


def payload_requests(out: Path) -> list[dict]:
    """The requests of the trace the run sent."""
    return [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
