"""Replicas forked from the function runtime's zygote: real processes, exact results, and restarts.

The embedded gateway forks faasmoe's function replicas from one process that imported torch once
(--function-spawn fork, the default) or runs each as a new interpreter (--function-spawn exec).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from faasmoe.bench.sampler import ProcessRoot, ProcessTreeSampler
from faasmoe.gateway.embedded.forkserver import ZYGOTE_MODULE
from faasmoe.gateway.embedded.process import GatewayProcess
from faasmoe.model.generate import generate
from faasmoe.model.sampling import SamplingParams
from faasmoe.planning.export import export
from tests.reference import load_reference, reference_greedy
from tests.test_remote_e2e import PROMPTS, deploy, remote_model

NEW_TOKENS = 8
DEADLINE_S = 30.0


def zygotes(gateway: GatewayProcess) -> list[psutil.Process]:
    return [p for p in psutil.Process(gateway.pid).children() if ZYGOTE_MODULE in p.cmdline()]


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def generate_remote(model_dir: Path, plan_dir: Path, gateway: GatewayProcess) -> list[list[int]]:
    split = remote_model(model_dir, plan_dir, gateway)
    try:
        return generate(split.trunk, PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))
    finally:
        split.close()


@pytest.fixture
def plan_dir(tiny_fp32: Path, tmp_path: Path) -> Path:
    export(tiny_fp32, tmp_path / "plan", 5)  # 3 functions per layer
    return tmp_path / "plan"


@pytest.fixture
def expected(tiny_fp32: Path) -> list[list[int]]:
    return reference_greedy(load_reference(tiny_fp32), PROMPTS, NEW_TOKENS)


def test_replicas_are_forked_from_one_zygote(tiny_fp32, plan_dir, expected, tmp_path):
    with GatewayProcess(args=["--log-dir", str(tmp_path / "logs")]) as gateway:
        deploy(gateway, plan_dir)
        assert generate_remote(tiny_fp32, plan_dir, gateway) == expected
        (zygote,) = zygotes(gateway)
        replicas = gateway.function_processes()
        assert len(replicas) == 6
        assert {p.ppid() for p in replicas} == {zygote.pid}
        assert len({p.pid for p in replicas}) == 6
        # The benchmark counts the zygote's memory in its own role, and not as a replica.
        sample = ProcessTreeSampler([ProcessRoot(gateway.pid, "gateway", "function")]).sample()
        assert sample.role("runtime").processes == 1 and sample.role("function").processes == 6
        assert sample.role("runtime").pss > 0
        # Each replica loaded its own shard after the fork: its log says so.
        for log in sorted((tmp_path / "logs").glob("moe-*.log")):
            assert "forked from the function runtime" in log.read_text()
            assert "experts" in log.read_text() and "ready" in log.read_text()
    assert not alive(zygote)
    assert not any(alive(p) for p in replicas)


def test_a_killed_zygote_takes_its_replicas_and_is_started_again(tiny_fp32, plan_dir, expected):
    with GatewayProcess() as gateway:
        deploy(gateway, plan_dir)
        assert generate_remote(tiny_fp32, plan_dir, gateway) == expected
        (zygote,) = zygotes(gateway)
        replicas = gateway.function_processes()
        os.kill(zygote.pid, signal.SIGKILL)
        # Replicas get SIGTERM when their parent dies: no orphan keeps its weights.
        wait_until(lambda: not any(alive(p) for p in replicas), "the zygote's replicas exit")
        assert generate_remote(tiny_fp32, plan_dir, gateway) == expected
        (again,) = zygotes(gateway)
        assert again.pid != zygote.pid
        assert {p.ppid() for p in gateway.function_processes()} == {again.pid}


def test_exec_spawn_runs_every_replica_as_a_new_interpreter(tiny_fp32, plan_dir, expected):
    with GatewayProcess(args=["--function-spawn", "exec"]) as gateway:
        deploy(gateway, plan_dir)
        assert generate_remote(tiny_fp32, plan_dir, gateway) == expected
        assert zygotes(gateway) == []
        replicas = gateway.function_processes()
        assert len(replicas) == 6
        assert {p.ppid() for p in replicas} == {gateway.pid}
