"""The direct path: calls straight to a warm replica the embedded gateway named, through real processes.

Exactness holds on it; a replica that is gone sends the call back through the gateway and the request
does not fail; a replica refuses a call meant for another function; and the gateway still scales a
function to zero after only direct calls, but not while they go on.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from faasmoe.dispatch.remote import InvocationLog
from faasmoe.experts.wire import CONTENT_TYPE
from faasmoe.function.headers import FUNCTION_HEADER
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.gateway.schemas import DIRECT_URL_HEADER
from faasmoe.model.generate import generate
from faasmoe.model.sampling import SamplingParams
from faasmoe.planning.export import export
from faasmoe.process import wait_until
from tests.reference import load_reference, reference_greedy
from tests.test_remote_e2e import PROMPTS, deploy, remote_model, replicas, running

NEW_TOKENS = 8
IDLE_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def plan_dir(tiny_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    plan = tmp_path_factory.mktemp("direct") / "plan"
    export(tiny_fp32, plan, 6)  # 2 functions per layer
    return plan


@pytest.fixture(scope="module")
def expected(tiny_fp32: Path) -> list[list[int]]:
    return reference_greedy(load_reference(tiny_fp32), PROMPTS, NEW_TOKENS)


def generate_logged(tiny_fp32: Path, plan_dir: Path, gateway: GatewayProcess, rounds: int = 1):
    log = InvocationLog()
    split = remote_model(tiny_fp32, plan_dir, gateway, log)
    try:
        outputs = [generate(split.trunk, PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS)) for _ in range(rounds)]
    finally:
        split.close()
    return outputs, log


def test_direct_calls_are_exact_and_skip_the_gateway(tiny_fp32, plan_dir, expected):
    with GatewayProcess() as gateway:
        deploy(gateway, plan_dir)
        outputs, log = generate_logged(tiny_fp32, plan_dir, gateway)
        assert outputs == [expected]
        through_gateway = [i for i in log.invocations if not i.direct]
        # Each function's first call goes through the gateway, which names its replica; the rest go straight.
        assert sorted(i.function for i in through_gateway) == sorted({i.function for i in log.invocations})
        assert len(log.invocations) > len(through_gateway)


def test_without_direct_replicas_every_call_goes_through_the_gateway(tiny_fp32, plan_dir, expected):
    with GatewayProcess(args=["--no-direct-replicas"]) as gateway:
        deploy(gateway, plan_dir)
        outputs, log = generate_logged(tiny_fp32, plan_dir, gateway)
        assert outputs == [expected]
        assert log.invocations and not any(i.direct for i in log.invocations)


def test_a_gone_replica_sends_the_call_back_through_the_gateway(tiny_fp32, plan_dir, expected):
    with GatewayProcess() as gateway:
        plan = deploy(gateway, plan_dir)
        log = InvocationLog()
        split = remote_model(tiny_fp32, plan_dir, gateway, log)
        try:
            assert generate(split.trunk, PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS)) == expected
            killed = gateway.function_processes()
            for process in killed:
                os.kill(process.pid, signal.SIGKILL)
            assert wait_until(lambda: not any(running(p.pid) for p in killed), 10)
            before = len(log.invocations)
            # The known addresses are fresh, so the next calls try them first, find nobody, and fall back.
            assert generate(split.trunk, PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS)) == expected
        finally:
            split.close()
        after = log.invocations[before:]
        assert {i.function for i in after if not i.direct} == {i.function for i in after}
        assert {i.function for i in after if i.cold_start} == {i.function for i in after}
        assert {p.pid for p in gateway.function_processes()}.isdisjoint(p.pid for p in killed)
        assert set(replicas(gateway)) == {f.name for f in plan.functions}


def test_a_replica_refuses_a_call_meant_for_another_function(tiny_fp32, plan_dir):
    with GatewayProcess() as gateway:
        plan = deploy(gateway, plan_dir)
        name, other = plan.functions[0].name, plan.functions[1].name
        answer = httpx.post(f"{gateway.url}/function/{name}", content=b"", headers={"Content-Type": CONTENT_TYPE},
                            trust_env=False, timeout=60)  # fmt: skip
        replica = answer.headers[DIRECT_URL_HEADER]
        assert answer.status_code == 400  # an empty body; the replica is up and named
        misdirected = httpx.post(replica, content=b"", headers={FUNCTION_HEADER: other}, trust_env=False)
        assert misdirected.status_code == 421 and name in misdirected.text


def test_direct_calls_keep_a_function_warm_and_it_scales_to_zero_after_them(tiny_fp32, plan_dir, expected):
    with GatewayProcess(args=["--reaper-interval", "0.2"]) as gateway:
        deploy(gateway, plan_dir, zero_duration=f"{IDLE_TIMEOUT_S:g}s")
        log = InvocationLog()
        split = remote_model(tiny_fp32, plan_dir, gateway, log)
        try:
            assert generate(split.trunk, PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS)) == expected
            warm = {p.pid for p in gateway.function_processes()}
            # Longer than the idle timeout, every call direct: only the replicas' own idle time tells the gateway.
            until = time.monotonic() + 2 * IDLE_TIMEOUT_S
            while time.monotonic() < until:
                assert generate(split.trunk, PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS)) == expected
            assert {p.pid for p in gateway.function_processes()} == warm  # none was stopped meanwhile
        finally:
            split.close()
        called = {i.function for i in log.invocations}
        assert len([i for i in log.invocations if not i.direct]) == len(called)  # each function's first call
        assert wait_until(lambda: set(replicas(gateway).values()) == {0}, 10 * IDLE_TIMEOUT_S), replicas(gateway)
        assert wait_until(lambda: not any(map(running, warm)), 10)
