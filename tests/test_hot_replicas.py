"""Hot-function replicas (faasmoe/elastic/hot_replicas.py): the policy and the scaler on a fake clock; a replicated
function's rows split over its replicas through a real embedded gateway, exact against transformers; and the
control plane's scaler adding a replica under real queueing, through the gateway's scale API, and taking it
back after."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import psutil
import pytest
import torch
import yaml

from faasmoe.dispatch.executor import open_executor
from faasmoe.dispatch.remote import Invocation, InvocationLog
from faasmoe.elastic.hot_replicas import (
    HotReplicaSettings,
    QueueWindow,
    ReadyReplicas,
    Replicas,
    ReplicaScaler,
    decide,
    max_replicas,
)
from faasmoe.gateway.client import GatewayClient, GatewaySettings
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.gateway.schemas import DEFAULT_SCALE_MAX, LABEL_SCALE_MAX, FunctionStatus
from faasmoe.model.generate import generate
from faasmoe.model.moe_block import RoutedTokens
from faasmoe.model.sampling import SamplingParams
from faasmoe.model.split_model import SplitModel
from faasmoe.planning.deploy import deploy_plan
from faasmoe.planning.export import export
from faasmoe.planning.plan import Plan
from faasmoe.planning.stack import StackSettings
from faasmoe.process import wait_until
from faasmoe.server.settings import ServeSettings
from tests.app_server import serving
from tests.conftest import TEST_THREADS
from tests.reference import load_reference, reference_greedy, reference_logits
from tests.test_prewarm import KEY, NEW_TOKENS, PROMPT, TENANT, complete
from tests.test_remote_e2e import FP32_TOLERANCE, PROMPTS
from tests.test_serve import METRICS_KEY, metric, read_metrics

# --- the policy, on a fake clock ----------------------------------------------------------------------------

POLICY = HotReplicaSettings(queue_target_ms=10, scale_in_delay_s=30, window_s=5, min_samples=3)
HOT_S, LOW_S = 0.02, 0.001  # mean queueing delays above the target, and below half of it


def replicas(desired: int, ready: int | None = None, most: int = 3) -> Replicas:
    return Replicas(desired, desired if ready is None else ready, most)


def test_queueing_above_the_target_adds_one_replica_once_all_serve_up_to_the_label():
    assert decide(HOT_S, 0.0, replicas(1), 0, POLICY) == 2
    assert decide(HOT_S, 0.0, replicas(2), 1, POLICY) == 3
    assert decide(HOT_S, 0.0, replicas(2, ready=1), 1, POLICY) is None  # the one asked for is still starting
    assert decide(HOT_S, 0.0, replicas(3), 2, POLICY) is None  # at com.openfaas.scale.max
    assert decide(HOT_S, 0.0, replicas(0), 0, POLICY) is None  # at zero: idle, the keep-alive's
    assert decide(0.009, 0.0, replicas(1), 0, POLICY) is None  # below the target
    assert decide(None, 0.0, replicas(1), 0, POLICY) is None  # too few calls to say


def test_only_an_added_replica_is_taken_back_after_the_delay_and_never_the_last():
    assert decide(LOW_S, 29.0, replicas(3), 2, POLICY) is None  # not low for long enough
    assert decide(LOW_S, 30.0, replicas(3), 2, POLICY) == 2
    assert decide(None, 30.0, replicas(3), 2, POLICY) == 2  # no calls at all is no queueing either
    assert decide(LOW_S, 30.0, replicas(3), 0, POLICY) is None  # raised by someone else: not this scaler's
    assert decide(LOW_S, 30.0, replicas(1), 1, POLICY) is None  # never below one while in use
    assert decide(LOW_S, 30.0, replicas(0), 1, POLICY) is None  # scaled to zero by the idler: never woken


def test_the_window_is_quiet_below_half_the_target_and_holds_in_the_band_between():
    window = QueueWindow(POLICY)
    assert window.tick(0.0) is None  # no calls: quiet from now
    for at in (1.0, 2.0, 3.0):
        window.observe(at, 0.007)  # above half the target, below it
    assert window.tick(3.0) == pytest.approx(0.007)
    assert window.quiet_for(100.0) == 0.0  # the band is not quiet: nothing scales in
    for at in (4.0, 5.0, 6.0):
        window.observe(at, LOW_S)
    # The sample at 1 s has left the 5 s window; the mean is below half the target: quiet from here.
    assert window.tick(7.0) == pytest.approx((2 * 0.007 + 3 * LOW_S) / 5)
    assert window.tick(9.0) == pytest.approx(LOW_S)  # only the low ones left
    assert window.quiet_for(37.0) == pytest.approx(30.0)
    window.restart()
    assert window.tick(40.0) is None and window.quiet_for(40.0) == 0.0  # the delay starts again


def test_an_idle_machines_queueing_never_triggers_the_default_target():
    # One call at a time (one engine): a call waits only for the hop onto the replica's compute thread.
    window = QueueWindow(HotReplicaSettings())
    for i in range(100):
        window.observe(i * 0.01, 0.0003)
    mean = window.tick(1.0)
    assert mean is not None and decide(mean, 0.0, replicas(1, most=DEFAULT_SCALE_MAX), 0, HotReplicaSettings()) is None


def test_the_label_bounds_replicas_and_settings_are_checked_at_the_edge():
    assert max_replicas({}) == DEFAULT_SCALE_MAX == 20
    assert max_replicas({LABEL_SCALE_MAX: "3"}) == 3
    assert max_replicas({LABEL_SCALE_MAX: "lots"}) is None and max_replicas({LABEL_SCALE_MAX: "0"}) is None
    assert not HotReplicaSettings(queue_target_ms="off").enabled and not HotReplicaSettings(queue_target_ms=0).enabled
    assert HotReplicaSettings().enabled and HotReplicaSettings().queue_target_ms == 100.0
    with pytest.raises(ValueError):
        HotReplicaSettings(queue_target_ms=-1)
    with pytest.raises(ValueError):
        ServeSettings(model="m", plan="p", tenants="t", hot_replicas={"scale_in_delay_s": 0})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScaleApi:
    """The two gateway calls the scaler makes, answered from a dict of statuses (replicas start when told)."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.status = FunctionStatus(name="f", image="expert-group", labels=labels, replicas=1, available_replicas=1)
        self.lists = 0
        self.scales: list[int] = []

    async def list_functions(self) -> list[FunctionStatus]:
        self.lists += 1
        return [self.status]

    async def scale(self, name: str, replicas: int) -> None:
        self.scales.append(replicas)
        self.set(replicas, ready=self.status.available_replicas)

    def set(self, desired: int, ready: int) -> None:
        self.status = self.status.model_copy(update={"replicas": desired, "available_replicas": ready})


def scaler_of(api: ScaleApi) -> tuple[ReplicaScaler, FakeClock]:
    clock = FakeClock()
    return ReplicaScaler(["f"], POLICY, ReadyReplicas(), clock=clock), clock


def feed(scaler: ReplicaScaler, clock: FakeClock, queue_s: float, calls: int = 3) -> None:
    for _ in range(calls):
        scaler.observe_invocation(Invocation("f", 0.01, 0, 0, cold_start=False, queue_seconds=queue_s))
        clock.now += 0.1


def test_the_scaler_adds_replicas_up_to_the_label_and_takes_back_only_its_own():
    async def scenario() -> None:
        api = ScaleApi({LABEL_SCALE_MAX: "3"})
        scaler, clock = scaler_of(api)
        assert await scaler.check(api) == {} and api.lists == 0  # nothing invoked: the gateway is not even asked

        feed(scaler, clock, HOT_S)
        assert await scaler.check(api) == {"f": 2}
        feed(scaler, clock, HOT_S)
        assert await scaler.check(api) == {}  # the new replica is still starting
        assert scaler.ready("f") == 1  # dispatch does not split over it yet
        api.set(2, ready=2)
        feed(scaler, clock, HOT_S)
        assert await scaler.check(api) == {}  # ready now: the window starts again, judged on two replicas
        feed(scaler, clock, HOT_S)
        assert scaler.ready("f") == 2 and await scaler.check(api) == {"f": 3}
        api.set(3, ready=3)
        feed(scaler, clock, HOT_S)
        await scaler.check(api)
        feed(scaler, clock, HOT_S)
        assert await scaler.check(api) == {} and api.scales == [2, 3]  # at the label's maximum

        clock.now += POLICY.window_s  # the calls stop: quiet from the next pass
        await scaler.check(api)
        clock.now += POLICY.scale_in_delay_s
        assert await scaler.check(api) == {"f": 2} and scaler.ready("f") == 2
        api.set(2, ready=2)
        await scaler.check(api)
        clock.now += POLICY.scale_in_delay_s
        assert await scaler.check(api) == {"f": 1} and scaler.ready("f") == 1
        api.set(1, ready=1)
        clock.now += 10 * POLICY.scale_in_delay_s
        assert await scaler.check(api) == {} and api.scales == [2, 3, 2, 1]  # never below one

    asyncio.run(scenario())


def test_the_scaler_lowers_nothing_another_component_set_and_forgets_a_function_scaled_to_zero():
    async def scenario() -> None:
        api = ScaleApi({})
        scaler, clock = scaler_of(api)
        feed(scaler, clock, HOT_S)
        assert await scaler.check(api) == {"f": 2} and scaler.added("f") == 1
        api.set(5, ready=5)  # an operator (or another autoscaler) sets 5
        feed(scaler, clock, LOW_S)
        await scaler.check(api)
        assert scaler.added("f") == 0 and scaler.ready("f") == 5
        clock.now += 10 * POLICY.scale_in_delay_s
        assert await scaler.check(api) == {} and api.scales == [2]

        feed(scaler, clock, HOT_S)
        api.set(0, ready=0)
        scaler.forget("f")  # the idler scaled it to zero
        assert scaler.ready("f") == 1 and scaler.added("f") == 0
        assert await scaler.check(api) == {}  # what was measured before is gone, and a function at zero stays there

        api.status.labels[LABEL_SCALE_MAX] = "lots"
        api.set(1, ready=1)
        feed(scaler, clock, HOT_S)
        assert await scaler.check(api) == {} and api.scales == [2]  # a bad label: not scaled out

    asyncio.run(scenario())


# --- through a real embedded gateway --------------------------------------------------------------------------

SCALE_MAX = 2
READY_WITHIN_S = 60.0
SCALED_WITHIN_S = 60.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with GatewayProcess(log_path=tmp_path_factory.mktemp("hot-gateway") / "gateway.log") as gateway:
        yield gateway


def client_call(gateway: GatewayProcess, call):
    async def go():
        async with GatewayClient(GatewaySettings(base_url=gateway.url)) as client:
            return await call(client)

    return asyncio.run(go())


def deploy_hot(gateway: GatewayProcess, model: Path, work: Path, prefix: str) -> Plan:
    """One function per MoE layer (all 12 experts), allowed ``SCALE_MAX`` replicas."""
    export(model, work / "plan", experts_per_function=12, prefix=prefix)
    plan = Plan.load(work / "plan")
    settings = StackSettings(weights_uri=str(work / "plan"), threads=TEST_THREADS, scale_max=SCALE_MAX)
    client_call(gateway, lambda client: deploy_plan(plan, client, settings))
    return plan


def statuses(gateway: GatewayProcess) -> dict[str, FunctionStatus]:
    return {status.name: status for status in client_call(gateway, lambda client: client.list_functions())}


def counts(gateway: GatewayProcess, name: str) -> tuple[int, int]:
    """(desired, ready) replicas of ``name``, as the gateway says."""
    status = statuses(gateway)[name]
    return status.replicas, status.available_replicas


def replica_invocations(gateway: GatewayProcess) -> dict[str, dict[int, int]]:
    """Per function, each running replica's (by pid) invocations, as the replicas' own /stats tell."""
    served: dict[str, dict[int, int]] = defaultdict(dict)
    for process in gateway.function_processes():
        for connection in process.net_connections("tcp"):
            if connection.status == psutil.CONN_LISTEN:
                stats = httpx.get(f"http://127.0.0.1:{connection.laddr.port}/stats", trust_env=False).json()
                served[stats["function"]][stats["pid"]] = stats["invocations"]
    return served


def replicated(gateway: GatewayProcess, plan: Plan) -> ReadyReplicas:
    """Every function of ``plan`` scaled to ``SCALE_MAX`` through the scale API; the ready counts once all serve."""
    names = [f.name for f in plan.functions]
    for name in names:
        client_call(gateway, lambda client, name=name: client.scale(name, SCALE_MAX))
    all_ready = wait_until(lambda: all(counts(gateway, n) == (SCALE_MAX, SCALE_MAX) for n in names), READY_WITHIN_S)
    assert all_ready, statuses(gateway)
    ready = ReadyReplicas()
    for name, status in statuses(gateway).items():
        ready.set(name, status.available_replicas)
    return ready


def split_model(model: Path, plan_dir: Path, gateway: GatewayProcess, ready: ReadyReplicas, log: InvocationLog):
    settings = GatewaySettings(base_url=gateway.url)
    return SplitModel.load(model, plan_dir, partial(open_executor, gateway=settings, log=log, ready_replicas=ready))


def split_prefill(split: SplitModel, log: InvocationLog, gateway: GatewayProcess) -> list[torch.Tensor]:
    """One prefill step's logits, checking that each layer's one call (the function holds all 12 experts) went
    out as one invocation per replica, each for a share of the experts, through the gateway."""
    names = [f.name for f in split.plan.functions]
    logits = split.trunk.step([split.trunk.new_sequence(p) for p in PROMPTS], all_logits=True)
    assert Counter(i.function for i in log.invocations) == dict.fromkeys(names, SCALE_MAX)
    assert not any(i.direct for i in log.invocations)
    served = replica_invocations(gateway)
    assert {name: list(served[name].values()) for name in names} == dict.fromkeys(names, [1] * SCALE_MAX)
    return logits


def test_a_replicated_functions_rows_are_split_over_its_replicas_and_stay_exact_fp32(tiny_fp32, gateway, tmp_path):
    plan = deploy_hot(gateway, tiny_fp32, tmp_path, "split32")
    names = [f.name for f in plan.functions]
    ready = replicated(gateway, plan)
    log = InvocationLog()
    split = split_model(tiny_fp32, tmp_path / "plan", gateway, ready, log)
    reference = load_reference(tiny_fp32)
    try:
        ours = split_prefill(split, log, gateway)
        for mine, theirs in zip(ours, reference_logits(reference, PROMPTS), strict=True):
            assert (mine - theirs).abs().max().item() <= FP32_TOLERANCE
        expected = reference_greedy(reference, PROMPTS, NEW_TOKENS)
        assert generate(split.trunk, PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS)) == expected
    finally:
        split.close()
    served = replica_invocations(gateway)
    assert all(min(served[name].values()) > 1 for name in names), served  # the decode steps too went to both


def test_a_replicated_functions_split_calls_stay_bit_identical_to_transformers_bf16(tiny_bf16, gateway, tmp_path):
    plan = deploy_hot(gateway, tiny_bf16, tmp_path, "split16")
    ready = replicated(gateway, plan)
    log = InvocationLog()
    split = split_model(tiny_bf16, tmp_path / "plan", gateway, ready, log)
    reference = load_reference(tiny_bf16)
    try:
        split_prefill(split, log, gateway)
        for prompt in PROMPTS:  # bit for bit one prompt at a time, as transformers batches other shapes
            (mine,) = split.trunk.step([split.trunk.new_sequence(prompt)], all_logits=True)
            (theirs,) = reference_logits(reference, [prompt])
            assert torch.equal(mine, theirs)  # each expert still computes all of its rows in one call
        expected = reference_greedy(reference, PROMPTS, NEW_TOKENS)
        assert generate(split.trunk, PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS)) == expected
    finally:
        split.close()
    served = replica_invocations(gateway)
    assert all(min(served[f.name].values()) > 1 for f in plan.functions), served


# The control plane's scaler, fed by real queueing: concurrent calls wait for one replica's compute thread.
LOAD_ROWS = 512  # about 6 ms of compute per call on this machine
CONCURRENT_CALLS = 8  # the later ones wait for the earlier ones: about 16 ms of mean queueing, 3x the target
LIVE_POLICY = HotReplicaSettings(queue_target_ms=5, scale_in_delay_s=2, window_s=1, min_samples=3,
                                 check_interval_s=0.1)  # fmt: skip
STAYS_FOR_S = 1.0  # ten scaler passes


def test_scale_out_under_queueing_and_scale_in_after_it_through_the_gateway(tiny_fp32, gateway, tmp_path):
    plan = deploy_hot(gateway, tiny_fp32, tmp_path, "hot")
    hot, other = plan.functions[0].name, plan.functions[1].name  # layers 0 and 1
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"tenants": [{"name": TENANT, "api_keys": [KEY]}]}))
    settings = ServeSettings(model=tiny_fp32, plan=tmp_path / "plan", tenants=tmp_path / "t.yaml", gateway=gateway.url,
                             metrics_key=METRICS_KEY, prewarm="off", hot_replicas=LIVE_POLICY)  # fmt: skip
    expected = reference_greedy(load_reference(tiny_fp32), [PROMPT], NEW_TOKENS)[0]
    generator = torch.Generator().manual_seed(0)
    hidden_size = plan.model.hidden_size
    load = RoutedTokens(
        layer=0,
        hidden=torch.randn(LOAD_ROWS, hidden_size, generator=generator),
        expert_ids=torch.randint(0, 12, (LOAD_ROWS, 4), generator=generator),
        weights=torch.rand(LOAD_ROWS, 4, generator=generator),
    )
    with serving(settings) as (platform, server):
        scaler = platform.replica_scaler
        assert scaler is not None
        executor = platform.model.executor  # the engine's own: its invocations feed the platform's scaler

        deadline = time.monotonic() + SCALED_WITHIN_S
        while counts(gateway, hot) != (SCALE_MAX, SCALE_MAX):  # queue calls until the scaler has added one
            assert time.monotonic() < deadline, statuses(gateway)[hot]
            for future in [executor.submit(load) for _ in range(CONCURRENT_CALLS)]:
                future.result()
        assert counts(gateway, other) == (0, 0)  # never invoked: never scaled
        assert wait_until(lambda: scaler.ready(hot) == SCALE_MAX, READY_WITHIN_S)  # what dispatch splits by
        assert scaler.added(hot) == 1

        before = replica_invocations(gateway)[hot]
        assert complete(server) == expected  # its calls to the hot function spread over both replicas, rows split
        after = replica_invocations(gateway)[hot]
        assert len(before) == SCALE_MAX and all(after[pid] > before[pid] for pid in before), (before, after)
        page = read_metrics(server.url)
        assert metric(page, "faasmoe_replica_scale_outs_total", function=hot) == 1  # not beyond the label
        assert metric(page, "faasmoe_function_queue_seconds_count", function=hot) > 0

        # No more queueing: after the delay the added replica is taken back, and never the last one.
        assert wait_until(lambda: counts(gateway, hot)[0] == 1, SCALED_WITHIN_S), statuses(gateway)[hot]
        # The gateway has scaled before its answer reaches the scaler.
        assert wait_until(lambda: scaler.added(hot) == 0 and scaler.ready(hot) == 1, SCALED_WITHIN_S)
        assert metric(read_metrics(server.url), "faasmoe_replica_scale_ins_total", function=hot) == 1
        assert not wait_until(lambda: counts(gateway, hot)[0] != 1, STAYS_FOR_S)
        assert complete(server) == expected
