"""Replicas forked from the function runtime's zygote: real processes, exact results, and restarts.

The embedded gateway forks faasmoe's function replicas from one process that imported torch once
(--function-spawn fork, the default) or runs each as a new interpreter (--function-spawn exec).
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from faasmoe.bench.sampler import ProcessRoot, ProcessTreeSampler
from faasmoe.gateway.client import GatewayClient, GatewaySettings
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.gateway.embedded.forkserver import ZYGOTE_MODULE, ForkServer
from faasmoe.model.generate import generate
from faasmoe.model.sampling import SamplingParams
from faasmoe.planning.deploy import deploy_plan
from faasmoe.planning.export import export
from faasmoe.planning.plan import Plan
from faasmoe.planning.stack import StackSettings
from faasmoe.process import listening_socket
from tests.conftest import TEST_THREADS
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


def test_a_replica_serves_on_the_socket_bound_for_it_before_it_started(plan_dir, tmp_path):
    """No check-then-bind race: the port is held from before the replica runs until it serves on it."""
    listener = listening_socket()
    port = listener.getsockname()[1]
    function = Plan.load(plan_dir).functions[0].name
    env = {"FAASMOE_FUNCTION": function, "FAASMOE_WEIGHTS_URI": str(plan_dir), "FAASMOE_THREADS": str(TEST_THREADS)}
    env |= {"FAASMOE_LISTEN_FD": str(listener.fileno()), "FAASMOE_PORT": str(port)}
    with (tmp_path / "replica.log").open("wb") as log:
        replica = subprocess.Popen([sys.executable, "-m", "faasmoe.function"], env=os.environ | env,
                                   pass_fds=(listener.fileno(),), stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    listener.close()  # the replica holds the only copy now, before its interpreter has even started
    try:
        with pytest.raises(OSError) as taken:
            socket.create_server(("127.0.0.1", port))
        assert taken.value.errno == errno.EADDRINUSE
        ready = f"http://127.0.0.1:{port}/ready"
        wait_until(lambda: replica.poll() is not None or _answers(ready), "the replica answers on its socket")
        assert replica.poll() is None, (tmp_path / "replica.log").read_text()
    finally:
        replica.terminate()
        replica.wait()


def test_a_spawn_cancelled_while_forking_leaves_no_reply_and_no_replica_behind(plan_dir, tmp_path):
    """A replica scaled down while it starts: the next spawn still gets its own replica, the unclaimed one stops."""
    first, second, third = (f.name for f in Plan.load(plan_dir).functions[:3])

    def env(function: str) -> dict[str, str]:
        return {**os.environ, "FAASMOE_FUNCTION": function, "FAASMOE_WEIGHTS_URI": str(plan_dir),
                "FAASMOE_THREADS": str(TEST_THREADS), "FAASMOE_HOST": "127.0.0.1"}  # fmt: skip

    async def go() -> None:
        server = ForkServer(tmp_path / "runtime.log", startup_timeout_s=120, env=dict(os.environ))
        log = tmp_path / "replicas.log"
        try:
            kept = await server.spawn(env(first), log)
            cancelled = asyncio.ensure_future(server.spawn(env(second), log))
            while not server._lock.locked():  # its request is on its way to the zygote
                await asyncio.sleep(0)
            cancelled.cancel()
            latest = await server.spawn(env(third), log)
            for child, function in ((kept, first), (latest, third)):
                stats = await asyncio.to_thread(_stats, f"http://127.0.0.1:{child.port}/stats")
                assert stats["function"] == function and stats["pid"] == child.pid
            zygote = psutil.Process(server._process.pid)
            replicas = {kept.pid, latest.pid}
            await asyncio.to_thread(
                wait_until, lambda: {p.pid for p in zygote.children() if alive(p)} == replicas, "unclaimed one stops"
            )
            for child in (kept, latest):
                child.terminate()
        finally:
            await server.close()

    asyncio.run(go())


def _stats(url: str) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            return httpx.get(url, trust_env=False).json()
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.05)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, trust_env=False).status_code == 200
    except httpx.TransportError:
        return False


def test_exec_spawn_runs_every_replica_as_a_new_interpreter(tiny_fp32, plan_dir, expected):
    with GatewayProcess(args=["--function-spawn", "exec"]) as gateway:
        deploy(gateway, plan_dir)
        assert generate_remote(tiny_fp32, plan_dir, gateway) == expected
        assert zygotes(gateway) == []
        replicas = gateway.function_processes()
        assert len(replicas) == 6
        assert {p.ppid() for p in replicas} == {gateway.pid}


GATEWAY_SECRET = "forkserver-secret-91c2"


def deploy_with_auth(gateway: GatewayProcess, plan_dir: Path, auth: tuple[str, str]) -> list[str]:
    settings = StackSettings(weights_uri=str(plan_dir), threads=TEST_THREADS)

    async def go() -> list[str]:
        client_settings = GatewaySettings(base_url=gateway.url, username=auth[0], password=auth[1], trust_env=False)
        async with GatewayClient(client_settings) as client:
            return await deploy_plan(Plan.load(plan_dir), client, settings)

    return asyncio.run(go())


def test_forked_replicas_and_their_zygote_hold_no_gateway_secret(plan_dir):
    # /proc/PID/environ of a forked replica is the zygote's environment at its start: both must be minimal.
    env = {**os.environ, "FAASMOE_GATEWAY_BASIC_AUTH_USER": "op", "FAASMOE_GATEWAY_BASIC_AUTH_PASSWORD": GATEWAY_SECRET}
    with GatewayProcess(env=env) as gateway:
        (name, *_) = deploy_with_auth(gateway, plan_dir, ("op", GATEWAY_SECRET))
        ready = httpx.get(f"{gateway.url}/function/{name}/ready", timeout=60, trust_env=False)
        assert ready.status_code == 200, ready.text
        (zygote,) = zygotes(gateway)
        (replica,) = gateway.function_processes()
        assert replica.ppid() == zygote.pid
        for process in (zygote, replica):
            environ = process.environ()
            assert GATEWAY_SECRET not in "\n".join(f"{key}={value}" for key, value in environ.items())
            assert not [key for key in environ if key.startswith("FAASMOE_GATEWAY_")]
            assert environ["PATH"] == os.environ["PATH"]


@pytest.mark.parametrize("spawn", ["fork", "exec"])
def test_a_shard_that_fails_to_load_is_a_500_in_seconds(plan_dir, spawn):
    plan = Plan.load(plan_dir)
    broken = plan.functions[0].name
    (plan_dir / "functions" / f"{broken}.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    # The production cold-start timeout (120 s): the old gateway waited it out, then the client retried.
    with GatewayProcess(args=["--function-spawn", spawn, "--cold-start-timeout", "120"]) as gateway:
        deploy(gateway, plan_dir)
        started = time.monotonic()
        response = httpx.post(f"{gateway.url}/function/{broken}", content=b"x", timeout=150, trust_env=False)
        elapsed = time.monotonic() - started
        assert response.status_code == 500, response.text
        assert response.text.startswith(f"function {broken!r} failed to load: ")
        assert f"{broken}.safetensors" in response.text
        assert elapsed < 30, f"{elapsed:.1f} s to answer a load failure"
        wait_until(lambda: not any(alive(p) for p in gateway.function_processes()), "the failed replica is stopped")
