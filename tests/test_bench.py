"""faasmoe bench: its parts on their own, then one real --quick run whose report's structure is checked.

The quick run starts real servers, gateways and function processes; the benchmark stops them
itself, and the fixture kills any descendant still alive afterwards, also when the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from faasmoe.bench.distributions import LengthDistribution
from faasmoe.bench.loadgen import RequestResult, tokens_in_chunk
from faasmoe.bench.metrics import (
    Percentiles,
    SystemResult,
    cost_figures,
    cpu_figures,
    function_figures,
    memory_figures,
    percentile,
    request_figures,
)
from faasmoe.bench.plots import MEMORY_FILE, SWEEP_FILE, write_plots
from faasmoe.bench.report import JSON_FILE, MARKDOWN_FILE, BenchReport, evaluate_targets, write_report
from faasmoe.bench.runner import bench_command
from faasmoe.bench.sampler import ProcessRoot, ProcessTreeSampler, RoleMemory, Sample
from faasmoe.bench.settings import BenchSettings, SystemKind
from faasmoe.bench.systems import system_specs
from faasmoe.bench.workload import generate_trace, load_trace
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
    assert labels == [
        "full-per-tenant",
        "full-shared",
        "static-experts",
        "faasmoe-shared/e1",
        "faasmoe-shared/e4",
        "faasmoe-shared/e12",
        "faasmoe-private/e1",
        "faasmoe-private/e4",
        "faasmoe-private/e12",
    ]
    assert BenchSettings(systems="full-shared,faasmoe-shared").systems == [
        SystemKind.FULL_SHARED,
        SystemKind.FAASMOE_SHARED,
    ]


# --- measurement -------------------------------------------------------------------------------


CHILD = "import time; x = bytearray(50_000_000); t = time.time()\nwhile time.time() - t < 1.0: pass\ntime.sleep(5)"
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


def test_stream_chunks_count_tokens() -> None:
    assert tokens_in_chunk({"choices": [{"text": "ab", "token_ids": [4, 5]}]}) == 2
    assert tokens_in_chunk({"choices": [{"text": "a"}]}) == 1
    assert tokens_in_chunk({"choices": [{"text": "", "finish_reason": "length"}]}) == 0


# --- report ------------------------------------------------------------------------------------


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
    targets = evaluate_targets(results)
    by = {(t.target, t.system): t for t in targets}
    assert by[("avg memory vs full-per-tenant", "faasmoe-shared/e4")].value == pytest.approx(0.15)
    assert by[("avg memory vs full-per-tenant", "faasmoe-shared/e4")].met is True
    assert by[("avg memory vs static-experts (< 1)", "faasmoe-shared/e12")].met is False
    assert by[("TPOT p50 vs full-shared", "faasmoe-shared/e4")].value == pytest.approx(1.2)
    report = BenchReport("faasmoe bench", "a machine", {}, {"config": {}}, {"tenants": 1}, results, [], targets)
    write_report(report, tmp_path)
    write_plots(results, tmp_path)
    check_report_files(tmp_path, [r.system for r in results])


def check_report_files(out: Path, systems: list[str]) -> dict:
    payload = json.loads((out / JSON_FILE).read_text())
    assert [r["system"] for r in payload["results"]] == systems
    for result in payload["results"]:
        assert RESULT_KEYS <= set(result)
        assert {"avg_pss_gb", "peak_pss_gb", "avg_anon_gb", "avg_file_gb", "pss_gb_s"} <= set(result["memory"])
        assert {"ttft_s", "tpot_s", "e2e_s", "throughput_tok_s"} <= set(result["requests"])
        assert {"p50", "p99"} <= set(result["requests"]["ttft_s"])
    table = [line for line in (out / MARKDOWN_FILE).read_text().splitlines() if line.startswith("| ")]
    for system in systems:
        assert sum(line.startswith(f"| {system} |") for line in table) == 1, system
    for name in (MEMORY_FILE, SWEEP_FILE):
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
    done = CliRunner().invoke(app, ["bench", "--quick", "--out", str(out), "--work-dir", str(work), "--no-progress"])
    assert done.exit_code == 0, done.output
    systems = ["full-per-tenant", "full-shared", "static-experts", "faasmoe-shared/e6", "faasmoe-private/e6"]
    payload = check_report_files(out, systems)
    assert not payload["failures"], payload["failures"]
    assert payload["command"] == f"faasmoe bench --out {out} --work-dir {work} --quick --no-progress"
    results = {r["system"]: r for r in payload["results"]}
    for result in results.values():
        assert result["requests"]["completed"] == result["requests"]["requests"] > 0, result["requests"]["errors"]
        assert result["memory"]["avg_pss_gb"] > 0 and result["cpu"]["cpu_s"] > 0
        assert result["requests"]["tpot_s"]["p50"] > 0 and result["requests"]["throughput_tok_s"] > 0
    # Robust whatever the machine: two full-model servers hold more than one; 2 layers x 12/6 functions
    # start at zero replicas, so serving cold-starts some of them; the static function is always on.
    assert results["full-per-tenant"]["memory"]["avg_pss_gb"] > results["full-shared"]["memory"]["avg_pss_gb"]
    shared = results["faasmoe-shared/e6"]["functions"]
    assert shared["deployed"] == 4 and shared["cold_starts"] >= 1
    assert results["static-experts"]["functions"]["cold_starts"] == 0
    assert (out / "trace.jsonl").read_text().count("\n") == payload["trace"]["requests"]
