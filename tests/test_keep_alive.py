"""Adaptive keep-alive: the policy from synthetic idle gaps (faasmoe/elastic/keep_alive.py), a label-only
update on the embedded gateway, and the control plane's idler (faasmoe/elastic/idler.py) through a real
gateway, its function processes and a recording proxy."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from faasmoe.elastic.idler import may_scale_to_zero
from faasmoe.elastic.keep_alive import (
    Basis,
    IdleHistory,
    KeepAliveMode,
    KeepAliveSettings,
    break_even_s,
    choose_keep_alive,
    histogram_tail_s,
    simulate,
)
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.gateway.embedded.pool import FunctionRegistry
from faasmoe.gateway.schemas import LABEL_SCALE_MIN, LABEL_SCALE_ZERO, LABEL_SCALE_ZERO_DURATION
from faasmoe.planning.export import export
from faasmoe.planning.plan import Plan
from faasmoe.process import wait_until
from faasmoe.server.platform import Platform
from faasmoe.server.settings import ServeSettings
from tests.app_server import AppServer, serving
from tests.reference import load_reference, reference_greedy
from tests.support.recording_proxy import SENT, RecordingProxy
from tests.test_pool import deploy as deploy_function
from tests.test_pool import deployment, leased_pid, run
from tests.test_prewarm import KEY, NEW_TOKENS, PROMPT, TENANT, complete
from tests.test_remote_e2e import deploy, replicas
from tests.test_serve import METRICS_KEY, metric, read_metrics

SETTINGS = KeepAliveSettings()  # bins of 1 s, the 99th percentile + 10%, trusted after 10 idle gaps
FIXED_S = 300.0


# --- the policy --------------------------------------------------------------------------------


def test_too_little_history_keeps_the_fixed_keep_alive():
    chosen = choose_keep_alive([2.0] * (SETTINGS.min_gaps - 1), FIXED_S, 1.0, SETTINGS)
    assert (chosen.seconds, chosen.basis) == (FIXED_S, Basis.FIXED)


def test_short_regular_gaps_give_a_short_keep_alive_above_them():
    gaps = [2.0 + 0.02 * i for i in range(30)]  # 2.0 .. 2.58 s
    chosen = choose_keep_alive(gaps, FIXED_S, 1.0, SETTINGS)
    assert chosen.basis is Basis.HISTOGRAM
    assert chosen.seconds == pytest.approx(3.0 * 1.1)  # the upper edge of bin [2, 3) s, plus the margin
    assert chosen.seconds > max(gaps)


def test_the_tail_percentile_leaves_out_the_rare_long_gap():
    gaps = [5.0] * 199 + [60.0]  # one gap in 200 is past the 99th percentile
    assert histogram_tail_s(gaps, 1.0, 99.0) == 6.0
    assert choose_keep_alive(gaps, FIXED_S, 1.0, SETTINGS).seconds == pytest.approx(6.6)
    assert histogram_tail_s(gaps, 1.0, 99.9) == 61.0


def test_bursts_apart_longer_than_the_fixed_keep_alive_fall_to_the_break_even():
    # Used in bursts an hour apart: no keep-alive up to 5 minutes bridges those gaps, so history asks for nothing
    # and staying warm is worth only what a cold start costs.
    gaps = [3600.0] * 20 + [4.0] * (SETTINGS.min_gaps - 1)
    chosen = choose_keep_alive(gaps, FIXED_S, 20.0, SETTINGS)
    assert (chosen.seconds, chosen.basis) == (20.0, Basis.BREAK_EVEN)


def test_out_of_range_gaps_do_not_hide_the_in_range_tail():
    gaps = [3600.0] * 50 + [10.0] * 20
    chosen = choose_keep_alive(gaps, FIXED_S, 2.0, SETTINGS)
    assert (chosen.seconds, chosen.basis) == (pytest.approx(11 * 1.1), Basis.HISTOGRAM)


def test_a_tail_reaching_the_upper_bound_keeps_the_fixed_keep_alive():
    gaps = [float(g) for g in range(1, 300, 10)]  # spread over the whole range
    chosen = choose_keep_alive(gaps, FIXED_S, 1.0, SETTINGS)
    assert (chosen.seconds, chosen.basis) == (FIXED_S, Basis.FIXED)


def test_the_break_even_is_a_floor_and_the_fixed_keep_alive_a_ceiling():
    gaps = [2.0] * 30
    chosen = choose_keep_alive(gaps, FIXED_S, 50.0, SETTINGS)  # a cold start is worth 50 s warm: wait that long
    assert (chosen.seconds, chosen.basis) == (50.0, Basis.BREAK_EVEN)
    assert choose_keep_alive(gaps, FIXED_S, 1e6, SETTINGS).seconds == FIXED_S
    assert choose_keep_alive(gaps, FIXED_S, 0.0, SETTINGS).seconds >= SETTINGS.bin_s


def test_break_even_prices_a_cold_start_at_the_whole_plan_stalled():
    # 18 functions of 1 GB: a 0.5 s cold start stalls 18 GB for 0.5 s, what keeping one warm 9 s costs.
    assert break_even_s(0.5, 10**9, 18 * 10**9) == pytest.approx(9.0)
    assert break_even_s(0.5, 0, 18 * 10**9) == math.inf


def test_idle_history_counts_gaps_of_a_bin_and_measures_the_cold_start():
    history = IdleHistory(SETTINGS)
    assert history.cold_start_s() == SETTINGS.cold_start_s  # nothing measured yet
    assert history.observe(started=0.0, ended=1.5, cold_start=True)
    assert not history.observe(started=1.6, ended=1.7, cold_start=False)  # 0.1 s later: in use, not idle
    assert history.observe(started=4.7, ended=4.8, cold_start=False)  # 3 s idle
    assert list(history.gaps) == [pytest.approx(3.0)]
    assert history.cold_start_s() == pytest.approx(1.5 - 0.1)


def test_simulated_bursts_adaptive_has_as_many_cold_starts_at_fewer_gb_s():
    # 3 bursts an hour apart, 12 invocations 10 s apart each, one function of 1 GB.
    times = [burst * 3600.0 + 10.0 * i for burst in range(3) for i in range(12)]
    fixed = simulate({"f": times}, {"f": 10**9}, KeepAliveMode.FIXED, FIXED_S, cold_start_s=1.0)
    adaptive = simulate({"f": times}, {"f": 10**9}, KeepAliveMode.ADAPTIVE, FIXED_S, cold_start_s=1.0)
    assert (fixed.invocations, fixed.cold_starts) == (adaptive.invocations, adaptive.cold_starts) == (36, 3)
    # fixed: 11 gaps of 10 s and 300 s after each burst. Adaptive: trusted after 10 gaps, the same within the first
    # burst, then 11 s (bin [10, 11) s) + 10% after each burst.
    assert fixed.gb_s == pytest.approx(3 * (110 + 300))
    assert adaptive.gb_s == pytest.approx(3 * (110 + 12.1))


def test_simulation_ends_the_last_keep_alive_at_the_trace_end():
    cost = simulate({"f": [0.0, 100.0]}, {"f": 2 * 10**9}, KeepAliveMode.FIXED, 60.0, 1.0, end_s=130.0)
    assert (cost.cold_starts, cost.gb_s) == (2, pytest.approx(2 * (60 + 30)))


def test_only_functions_labelled_for_it_are_scaled_to_zero():
    assert may_scale_to_zero({LABEL_SCALE_ZERO: "true"})
    assert not may_scale_to_zero({LABEL_SCALE_ZERO: "false"})
    assert not may_scale_to_zero({})  # OpenFaaS Pro's default: no scale to zero
    assert not may_scale_to_zero({LABEL_SCALE_ZERO: "true", LABEL_SCALE_MIN: "1"})


# --- the embedded gateway: a label-only update ----------------------------------------------------


def test_a_label_only_update_keeps_the_replicas_and_changes_when_they_scale_to_zero(tmp_path: Path):
    async def scenario(registry: FunctionRegistry) -> None:
        pool = deploy_function(registry, deployment("kept", labels={LABEL_SCALE_ZERO_DURATION: "30s"}))
        pid = await leased_pid(pool)
        registry.reap_once(now=time.monotonic() + 10)
        assert pool.desired == 1  # 10 s idle: within 30 s

        await registry.update(deployment("kept", labels={LABEL_SCALE_ZERO_DURATION: "5s"}))
        assert [r.pid for r in pool.replicas] == [pid] and not pool.replicas[0].has_exited()
        assert registry.status("kept").labels[LABEL_SCALE_ZERO_DURATION] == "5s"
        assert await leased_pid(pool) == pid  # still the replica started first
        registry.reap_once(now=time.monotonic() + 10)
        assert (pool.desired, pool.replicas) == (0, [])  # 10 s idle: past the new 5 s

        # Anything else than labels still redeploys.
        await registry.update(deployment("kept", GREETING="changed"))
        assert await leased_pid(pool) != pid

    run(tmp_path, scenario)


# --- the idler, through a real platform -----------------------------------------------------------

LABELLED_ZERO_DURATION = "5m"  # the upper bound: the gateway by itself scales nothing down during a test
SCALED_WITHIN_S = 30.0
QUIET_WINDOW_S = 1.0  # ten of the adaptive idler's check intervals
SCALE_PATH = "/system/scale-function/"
POLICY = KeepAliveSettings(min_gaps=2, check_interval_s=0.1)


class FakeClock:
    """The idler's clock, moved by the test: idle gaps of minutes pass in no time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Cluster:
    model: Path
    work: Path
    gateway: GatewayProcess
    plan: Plan
    expected: list[int]

    @contextmanager
    def serve(self, proxy: RecordingProxy, keep_alive: str) -> Iterator[tuple[Platform, AppServer]]:
        settings = ServeSettings(model=self.model, plan=self.work / "plan", tenants=self.work / "t.yaml",
                                 gateway=proxy.url, metrics_key=METRICS_KEY, prewarm="off", keep_alive=keep_alive,
                                 keep_alive_policy=POLICY)  # fmt: skip
        with serving(settings) as served:
            yield served


@pytest.fixture(scope="module")
def cluster(tiny_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("keep-alive")
    export(tiny_fp32, work / "plan", experts_per_function=6)
    (work / "t.yaml").write_text(yaml.safe_dump({"tenants": [{"name": TENANT, "api_keys": [KEY]}]}))
    expected = reference_greedy(load_reference(tiny_fp32), [PROMPT], NEW_TOKENS)[0]
    with GatewayProcess(log_path=work / "gateway.log") as gateway:
        plan = deploy(gateway, work / "plan", zero_duration=LABELLED_ZERO_DURATION)
        yield Cluster(tiny_fp32, work, gateway, plan, expected)


def scale_calls(proxy: RecordingProxy) -> list[str]:
    return [e.path.removeprefix(SCALE_PATH) for e in proxy.events if e.kind == SENT and e.path.startswith(SCALE_PATH)]


def test_adaptive_keep_alive_scales_idle_functions_to_zero_long_before_their_label(cluster: Cluster):
    names = [f.name for f in cluster.plan.functions]
    with RecordingProxy(cluster.gateway.url) as proxy, cluster.serve(proxy, "adaptive") as (platform, server):
        assert platform.idler is not None
        clock = FakeClock()
        platform.idler.clock = clock
        for _ in range(3):  # idle gaps of 10 s between requests
            assert complete(server) == cluster.expected
            clock.advance(10.0)
        assert scale_calls(proxy) == []  # 10 s idle: within any keep-alive these gaps give

        keep_alive = {name: platform.idler.keep_alive(name) for name in names}
        assert all(chosen.basis in (Basis.HISTOGRAM, Basis.BREAK_EVEN) for chosen in keep_alive.values()), keep_alive
        assert all(10.0 < chosen.seconds < FIXED_S for chosen in keep_alive.values()), keep_alive
        page = read_metrics(server.url)
        for name, chosen in keep_alive.items():
            assert metric(page, "faasmoe_keep_alive_seconds", function=name) == pytest.approx(chosen.seconds)

        clock.advance(max(chosen.seconds for chosen in keep_alive.values()))
        assert wait_until(lambda: sorted(scale_calls(proxy)) == sorted(names), SCALED_WITHIN_S), scale_calls(proxy)
        assert wait_until(lambda: not any(replicas(cluster.gateway)[name] for name in names), SCALED_WITHIN_S)
        page = read_metrics(server.url)
        assert all(metric(page, "faasmoe_keep_alive_scale_downs_total", function=name) == 1 for name in names)

        # Scaled down, not broken: the next request cold-starts them and is exact.
        assert complete(server) == cluster.expected
        assert sorted(scale_calls(proxy)) == sorted(names)  # warm again: not scaled down twice


def test_fixed_keep_alive_sends_no_scale_calls(cluster: Cluster):
    with RecordingProxy(cluster.gateway.url) as proxy, cluster.serve(proxy, "fixed") as (platform, server):
        assert platform.idler is None
        for _ in range(3):
            assert complete(server) == cluster.expected

        def system_calls() -> list[str]:
            return [e.path for e in proxy.events if e.path.startswith("/system/")]

        assert not wait_until(lambda: bool(system_calls()), QUIET_WINDOW_S), system_calls()
        assert "faasmoe_keep_alive_seconds{" not in read_metrics(server.url)
