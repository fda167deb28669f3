"""End to end through real processes: embedded gateway + function processes + remote executor."""

from __future__ import annotations

import asyncio
import os
import signal
from functools import partial
from pathlib import Path

import psutil
import pytest
import torch

from faasmoe.dispatch.executor import open_executor
from faasmoe.dispatch.remote import InvocationLog
from faasmoe.gateway.client import GatewayClient, GatewaySettings
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.model.generate import generate
from faasmoe.model.sampling import SamplingParams
from faasmoe.model.split_model import SplitModel
from faasmoe.planning.deploy import deploy_plan
from faasmoe.planning.export import export
from faasmoe.planning.plan import Plan
from faasmoe.planning.stack import StackSettings
from faasmoe.process import wait_until
from tests.conftest import TEST_THREADS
from tests.reference import load_reference, reference_greedy, reference_logits

NEW_TOKENS = 16
FP32_TOLERANCE = 1e-5
PROMPTS = [[11, 42, 7, 300, 5, 19, 77, 2, 64], [5, 9, 120, 33]]


@pytest.fixture
def gateway():
    with GatewayProcess() as gw:
        yield gw


def deploy(gateway: GatewayProcess, plan_dir: Path, zero_duration: str = "5m") -> Plan:
    plan = Plan.load(plan_dir)
    settings = StackSettings(weights_uri=str(plan_dir), threads=TEST_THREADS, zero_duration=zero_duration)

    async def go() -> None:
        async with GatewayClient(GatewaySettings(base_url=gateway.url)) as client:
            await deploy_plan(plan, client, settings)

    asyncio.run(go())
    return plan


def replicas(gateway: GatewayProcess) -> dict[str, int]:
    async def go() -> dict[str, int]:
        async with GatewayClient(GatewaySettings(base_url=gateway.url)) as client:
            return {f.name: f.replicas for f in await client.list_functions()}

    return asyncio.run(go())


def remote_model(model_dir: Path, plan_dir: Path, gateway: GatewayProcess, log: InvocationLog | None = None):
    settings = GatewaySettings(base_url=gateway.url)
    return SplitModel.load(model_dir, plan_dir, partial(open_executor, gateway=settings, log=log))


@pytest.mark.parametrize(("experts_per_function", "layers_per_function"), [(5, 1), (12, 2)])
def test_fp32_logits_and_greedy_through_functions(
    tiny_fp32, tmp_path, gateway, experts_per_function, layers_per_function
):
    export(tiny_fp32, tmp_path / "plan", experts_per_function, layers_per_function)
    deploy(gateway, tmp_path / "plan")
    reference = load_reference(tiny_fp32)
    split = remote_model(tiny_fp32, tmp_path / "plan", gateway)
    try:
        sequences = [split.trunk.new_sequence(p) for p in PROMPTS]
        ours = split.trunk.step(sequences, all_logits=True)
        for mine, theirs in zip(ours, reference_logits(reference, PROMPTS), strict=True):
            assert (mine - theirs).abs().max().item() <= FP32_TOLERANCE
        expected = reference_greedy(reference, PROMPTS, NEW_TOKENS)
        assert generate(split.trunk, PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS)) == expected
    finally:
        split.close()


def test_bf16_bit_identical_through_functions(tiny_bf16, tmp_path, gateway):
    export(tiny_bf16, tmp_path / "plan", 4)
    deploy(gateway, tmp_path / "plan")
    reference = load_reference(tiny_bf16)
    split = remote_model(tiny_bf16, tmp_path / "plan", gateway)
    try:
        prompt = PROMPTS[0]
        (ours,) = split.trunk.step([split.trunk.new_sequence(prompt)], all_logits=True)
        assert torch.equal(ours, reference_logits(reference, [prompt])[0])
        expected = reference_greedy(reference, [prompt], NEW_TOKENS)
        assert generate(split.trunk, [prompt], SamplingParams(max_new_tokens=NEW_TOKENS)) == expected
    finally:
        split.close()


def test_cold_start_then_scale_to_zero(tiny_fp32, tmp_path, gateway):
    export(tiny_fp32, tmp_path / "plan", 6)
    plan = deploy(gateway, tmp_path / "plan", zero_duration="2s")
    assert set(replicas(gateway).values()) == {0}
    assert gateway.function_processes() == []

    log = InvocationLog()
    split = remote_model(tiny_fp32, tmp_path / "plan", gateway, log)
    try:
        expected = reference_greedy(load_reference(tiny_fp32), PROMPTS[:1], 8)
        assert generate(split.trunk, PROMPTS[:1], SamplingParams(max_new_tokens=8)) == expected
    finally:
        split.close()
    invoked = {i.function for i in log.invocations}
    assert invoked and invoked <= {f.name for f in plan.functions}
    assert {i.function for i in log.invocations if i.cold_start} == invoked
    assert all(replicas(gateway)[name] >= 1 for name in invoked)
    pids = [p.pid for p in gateway.function_processes()]
    assert pids

    scaled_to_zero = wait_until(lambda: set(replicas(gateway).values()) == {0} and not any(map(running, pids)), 30)
    assert scaled_to_zero, f"replicas {replicas(gateway)}, still running: {[pid for pid in pids if running(pid)]}"


def running(pid: int) -> bool:
    """The process exists and is not a zombie (exited, not yet reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_function_processes_killed_mid_generation(tiny_fp32, tmp_path, gateway):
    export(tiny_fp32, tmp_path / "plan", 12)  # one function per layer: every token needs every function
    deploy(gateway, tmp_path / "plan")
    expected = reference_greedy(load_reference(tiny_fp32), PROMPTS, NEW_TOKENS)
    log = InvocationLog()
    killed: list[int] = []

    def kill_midway(invocation) -> None:
        if len(log.invocations) == 10 and not killed:  # a few decode steps in
            for process in gateway.function_processes():
                os.kill(process.pid, signal.SIGKILL)
                killed.append(process.pid)

    log.observers.append(kill_midway)
    split = remote_model(tiny_fp32, tmp_path / "plan", gateway, log)
    try:
        assert generate(split.trunk, PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS)) == expected
    finally:
        split.close()
    assert killed
