"""Prewarm (faasmoe/elastic/prewarm.py) through real processes: the embedded gateway, its function processes,
`faasmoe serve`, and a recording proxy between the control plane and the gateway that shows what reached
the gateway in which order."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import yaml

from faasmoe.dispatch.executor import open_executor
from faasmoe.dispatch.remote import GatewayConnection, InvocationLog
from faasmoe.elastic.prewarm import Prewarmer, WakeOutcome
from faasmoe.gateway.client import GatewayClient, GatewaySettings
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.model.generate import generate
from faasmoe.model.sampling import SamplingParams
from faasmoe.model.split_model import SplitModel
from faasmoe.planning.export import export
from faasmoe.planning.plan import Plan
from faasmoe.process import wait_until
from faasmoe.server.metrics import Metrics
from faasmoe.server.process import ServeProcess
from faasmoe.server.settings import ServeSettings
from tests.app_server import AppServer, serving
from tests.conftest import TEST_THREADS
from tests.reference import load_reference, reference_greedy
from tests.support.recording_proxy import ANSWERED, SENT, Event, RecordingProxy
from tests.test_remote_e2e import deploy, replicas
from tests.test_serve import METRICS_KEY, metric, read_metrics

KEY = "sk-prewarm-0001"
TENANT = "alpha"
PROMPT = [11, 42, 7, 300, 5, 19, 77, 2, 64]
NEW_TOKENS = 6
ZERO_DURATION = "3s"  # short, so that a test sees every function at zero soon after its last use
SCALED_TO_ZERO_WITHIN_S = 30.0
OUTCOMES_WITHIN_S = 30.0
SCALE_PATH = "/system/scale-function/"
STATUS_PATH = "/system/function/"
INVOKE_PATH = "/function/"
PREWARM_CALLS = "faasmoe_prewarm_calls_total"


@dataclass
class Cluster:
    model: Path
    work: Path
    gateway: GatewayProcess
    plan: Plan  # 2 layers x 2 functions, scaling to zero after ZERO_DURATION
    decoys: Plan  # deployed, but no request of this model invokes them
    expected: list[int]  # transformers' greedy tokens for PROMPT

    def serve(self, proxy: RecordingProxy, prewarm: str) -> ServeProcess:
        """`faasmoe serve --prewarm PREWARM` with the gateway behind ``proxy``."""
        args = ["--model", str(self.model), "--plan", str(self.work / "plan"), "--tenants", str(self.work / "t.yaml"),
                "--gateway", proxy.url, "--threads", str(TEST_THREADS), "--metrics-key", METRICS_KEY,
                "--prewarm", prewarm]  # fmt: skip
        return ServeProcess(args=args, log_path=self.work / f"serve-{prewarm}.log")

    @contextmanager
    def serve_in_process(self, proxy: RecordingProxy, prewarm: str) -> Iterator[AppServer]:
        settings = ServeSettings(model=self.model, plan=self.work / "plan", tenants=self.work / "t.yaml",
                                 gateway=proxy.url, metrics_key=METRICS_KEY, prewarm=prewarm)  # fmt: skip
        with serving(settings) as (_, server):
            yield server

    def wait_until_plan_at_zero(self) -> None:
        names = {f.name for f in self.plan.functions}
        done = wait_until(
            lambda: not any(r for n, r in replicas(self.gateway).items() if n in names), SCALED_TO_ZERO_WITHIN_S
        )
        assert done, f"the plan's functions did not scale to zero: {replicas(self.gateway)}"


@pytest.fixture(scope="module")
def cluster(tiny_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("prewarm")
    export(tiny_fp32, work / "plan", experts_per_function=6)
    export(tiny_fp32, work / "decoys", experts_per_function=12, prefix="decoy")
    (work / "t.yaml").write_text(yaml.safe_dump({"tenants": [{"name": TENANT, "api_keys": [KEY]}]}))
    expected = reference_greedy(load_reference(tiny_fp32), [PROMPT], NEW_TOKENS)[0]
    with GatewayProcess(log_path=work / "gateway.log") as gateway:
        plan = deploy(gateway, work / "plan", zero_duration=ZERO_DURATION)
        decoys = deploy(gateway, work / "decoys", zero_duration="5m")
        yield Cluster(tiny_fp32, work, gateway, plan, decoys, expected)


def complete(server: ServeProcess | AppServer) -> list[int]:
    body = {"model": "tiny-fp32", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    response = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=120, trust_env=False)  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def first_index(events: list[Event], kind: str, method: str, path: str) -> int | None:
    return next((i for i, e in enumerate(events) if (e.kind, e.method, e.path) == (kind, method, path)), None)


def paths(events: list[Event], prefix: str) -> list[str]:
    return [e.path for e in events if e.kind == SENT and e.path.startswith(prefix)]


def test_after_scale_to_zero_prewarm_all_scales_later_layers_before_the_forward_pass_invokes_them(cluster: Cluster):
    with RecordingProxy(cluster.gateway.url) as proxy, cluster.serve(proxy, "all") as server:
        cluster.wait_until_plan_at_zero()
        mark = len(proxy.events)
        assert complete(server) == cluster.expected
        later = assert_later_layers_woken_before_invoked(cluster.plan, proxy.since(mark))
        page = read_metrics(server.url)
        assert all(metric(page, PREWARM_CALLS, function=name, outcome="scaled") == 1 for name in later)

        # Right after, every function was just invoked: believed warm, so a request asks the gateway nothing.
        mark = len(proxy.events)
        assert complete(server) == cluster.expected
        assert paths(proxy.since(mark), "/system/function") == []


def test_prewarm_predicted_wakes_what_the_popularity_predictor_expects(cluster: Cluster):
    # No routing seen yet: the prior spreads a 9-token prompt's 36 slots per layer over every expert, so
    # each function (6 of 12 experts) is all but certain to be invoked, and is woken.
    with RecordingProxy(cluster.gateway.url) as proxy, cluster.serve_in_process(proxy, "predicted") as server:
        cluster.wait_until_plan_at_zero()
        mark = len(proxy.events)
        assert complete(server) == cluster.expected
        assert_later_layers_woken_before_invoked(cluster.plan, proxy.since(mark))


def assert_later_layers_woken_before_invoked(plan: Plan, events: list[Event]) -> list[str]:
    """Every function of a layer after the first that the request invoked had its scale call answered before
    its first invocation was sent; every function was asked about. Returns the later layers' functions."""
    first_layer = min(layer for f in plan.functions for layer in f.layers)
    later = [f.name for f in plan.functions if min(f.layers) > first_layer]
    invoked_later = [name for name in later if first_index(events, SENT, "POST", INVOKE_PATH + name) is not None]
    assert invoked_later, f"no later layer's function was invoked: {paths(events, INVOKE_PATH)}"
    for name in invoked_later:
        scaled = first_index(events, ANSWERED, "POST", SCALE_PATH + name)
        invoked = first_index(events, SENT, "POST", INVOKE_PATH + name)
        assert scaled is not None, f"{name} was invoked but never prewarmed: {paths(events, '/system/')}"
        assert events[scaled].status == 202
        assert scaled < invoked, f"{name}: the scale call came back after the forward pass invoked it"
    # All at once: the first layer's functions were asked about too (the forward pass may have woken them first).
    assert {STATUS_PATH + f.name for f in plan.functions} <= set(paths(events, STATUS_PATH))
    return later


def test_prewarm_off_makes_no_scale_calls_and_pays_the_cold_starts_in_the_forward_pass(cluster: Cluster):
    with RecordingProxy(cluster.gateway.url) as proxy, cluster.serve_in_process(proxy, "off") as server:
        cluster.wait_until_plan_at_zero()
        mark = len(proxy.events)
        assert complete(server) == cluster.expected
        events = proxy.since(mark)
        assert paths(events, SCALE_PATH) == [] and paths(events, STATUS_PATH) == []
        invoked = {path.removeprefix(INVOKE_PATH) for path in paths(events, INVOKE_PATH)}
        assert invoked
        page = read_metrics(server.url)
        assert all(metric(page, "faasmoe_function_cold_starts_total", function=name) >= 1 for name in invoked)
        assert PREWARM_CALLS + "{" not in page


def test_a_wrong_prediction_or_a_failing_predictor_fails_no_request_and_never_lowers_replicas(cluster: Cluster):
    unused_at_zero, unused_at_two = (f.name for f in cluster.decoys.functions)
    needed = cluster.plan.functions[0].name
    scale(cluster.gateway, unused_at_two, 2)

    def wrong_guess(tenant: str, tokens: int) -> dict[str, float]:
        # Functions this request never invokes, one that does not exist, and one it needs, below the threshold.
        return {unused_at_zero: 0.9, unused_at_two: 1.0, "no-such-function": 0.5, needed: 0.01}

    metrics = Metrics()
    with RecordingProxy(cluster.gateway.url) as proxy, remote_split(cluster, proxy) as (split, connection, log):
        prewarmer = Prewarmer(connection, wrong_guess, threshold=0.05, max_concurrent=4, observer=metrics)
        log.observers.append(prewarmer.observe_invocation)
        for _ in range(3):  # three admissions at once: one wake in flight per function, never a second scale
            prewarmer.prewarm(TENANT, len(PROMPT))
        assert generate(split.trunk, [PROMPT], SamplingParams(max_new_tokens=NEW_TOKENS)) == [cluster.expected]

        expected = [(unused_at_zero, WakeOutcome.SCALED), (unused_at_two, WakeOutcome.ALREADY_UP),
                    ("no-such-function", WakeOutcome.NOT_FOUND)]  # fmt: skip
        outcomes = partial(wake_counts, metrics, expected)
        assert wait_until(lambda: all(outcomes().values()), OUTCOMES_WITHIN_S), outcomes()
        assert paths(proxy.events, SCALE_PATH).count(SCALE_PATH + unused_at_zero) == 1
        assert SCALE_PATH + unused_at_two not in paths(proxy.events, SCALE_PATH)
        assert not [p for p in paths(proxy.events, "/system/") if p.endswith("/" + needed)]
        assert replicas(cluster.gateway)[unused_at_two] == 2  # never lowered to the one a wake asks for
        assert replicas(cluster.gateway)[unused_at_zero] == 1  # woken for nothing: only memory-time lost

        def broken(tenant: str, tokens: int) -> dict[str, float]:
            raise ValueError("a predictor with a bug")

        failing = Prewarmer(connection, broken, threshold=0.05, max_concurrent=4, observer=metrics)
        failing.prewarm(TENANT, len(PROMPT))
        assert generate(split.trunk, [PROMPT], SamplingParams(max_new_tokens=NEW_TOKENS)) == [cluster.expected]
        failures = partial(metrics.registry.get_sample_value, "faasmoe_prewarm_prediction_failures_total")
        assert wait_until(lambda: failures() == 1, OUTCOMES_WITHIN_S)
    for name in (unused_at_zero, unused_at_two):
        scale(cluster.gateway, name, 0)


def wake_counts(metrics: Metrics, wakes: list[tuple[str, WakeOutcome]]) -> dict[tuple[str, str], float]:
    """How often each (function, outcome) was counted in faasmoe_prewarm_calls_total."""
    counts = {}
    for function, outcome in wakes:
        labels = {"function": function, "outcome": outcome.value}
        counts[function, outcome.value] = metrics.registry.get_sample_value(PREWARM_CALLS, labels) or 0.0
    return counts


@contextmanager
def remote_split(
    cluster: Cluster, proxy: RecordingProxy
) -> Iterator[tuple[SplitModel, GatewayConnection, InvocationLog]]:
    """The split model on one shared gateway connection through ``proxy``, as the control plane runs it."""
    connection = GatewayConnection(GatewaySettings(base_url=proxy.url))
    log = InvocationLog(keep=False)
    try:
        opener = partial(open_executor, gateway=connection, log=log)
        split = SplitModel.load(cluster.model, cluster.work / "plan", opener)
        try:
            yield split, connection, log
        finally:
            split.close()
    finally:
        connection.close()


def scale(gateway: GatewayProcess, name: str, count: int) -> None:
    async def go() -> None:
        async with GatewayClient(GatewaySettings(base_url=gateway.url)) as client:
            await client.scale(name, count)

    asyncio.run(go())
    assert wait_until(lambda: replicas(gateway)[name] == count, 10.0)
