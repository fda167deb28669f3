"""The function pool's state machine, driven in-process through the real registry and launcher.

Replicas are real processes of tests/support/echo_function.py (exec'd, as a function image would be);
no HTTP gateway runs: each test calls the pool as the gateway's routes do.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from faasmoe.gateway.embedded.config import EmbeddedGatewaySettings
from faasmoe.gateway.embedded.pool import FunctionPool, FunctionRegistry
from faasmoe.gateway.embedded.replica import FunctionFailed, Replica, ReplicaState, ReplicaUnavailable
from faasmoe.gateway.schemas import LABEL_SCALE_ZERO_DURATION, FunctionDeployment

ECHO_FUNCTION = Path(__file__).parent / "support" / "echo_function.py"
DEADLINE_S = 15.0
POLL_S = 0.02


@asynccontextmanager
async def running_registry(log_dir: Path, **settings: Any) -> AsyncIterator[FunctionRegistry]:
    defaults: dict[str, Any] = dict(
        function_command=[sys.executable, str(ECHO_FUNCTION)],
        function_spawn="exec",
        log_dir=log_dir,
        allow_env_vars=["ECHO_*", "GREETING"],
        cold_start_timeout_s=10.0,
        reaper_interval_s=3600.0,  # the tests reap themselves, at the times they choose
    )
    registry = FunctionRegistry.start(EmbeddedGatewaySettings(**(defaults | settings)))
    try:
        yield registry
    finally:
        await registry.close()


def deployment(name: str, labels: dict[str, str] | None = None, **env: str) -> FunctionDeployment:
    return FunctionDeployment(service=name, image="echo", env_vars={"ECHO_READY_AFTER_S": "0.1", **env},
                              labels=labels or {})  # fmt: skip


def starts(log_dir: Path, name: str) -> int:
    """How many replicas of ``name`` the launcher started: each start is a line in the function's log."""
    path = log_dir / f"{name}.log"
    return path.read_text().count(" starting replica: ") if path.exists() else 0


async def get(registry: FunctionRegistry, replica: Replica, path: str) -> str:
    response = await registry.launcher.http.get(replica.url + path)
    assert response.status_code == 200, response.text
    return response.text


async def poll(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(POLL_S)


async def leased_pid(pool: FunctionPool) -> int | None:
    async with pool.lease() as replica:
        return replica.pid


def invocation(body: bytes) -> Request:
    """A POST /function/NAME/ as the gateway's route hands it to the pool."""
    scope = {"type": "http", "method": "POST", "path": "/function/f/", "raw_path": b"/function/f/",
             "query_string": b"", "headers": [(b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "state": {"call_id": "test"}}  # fmt: skip
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def run(log_dir: Path, scenario: Callable[[FunctionRegistry], Awaitable[None]], **settings: Any) -> None:
    """``scenario`` on a running registry (closed after it, every replica stopped)."""

    async def main() -> None:
        async with running_registry(log_dir, **settings) as registry:
            await scenario(registry)

    asyncio.run(main())


def deploy(registry: FunctionRegistry, function: FunctionDeployment) -> FunctionPool:
    registry.deploy(function)
    return registry.pool(function.service)


def test_first_lease_scales_from_zero(tmp_path: Path) -> None:
    async def scenario(registry: FunctionRegistry) -> None:
        pool = deploy(registry, deployment("cold"))
        assert (pool.desired, pool.replicas) == (0, [])
        async with pool.lease() as replica:
            assert replica.state is ReplicaState.READY
            assert (pool.desired, pool.in_flight, replica.in_flight) == (1, 1, 1)
            assert int(await get(registry, replica, "/pid")) == replica.pid
        assert (pool.in_flight, replica.in_flight) == (0, 0)
        assert registry.status("cold").available_replicas == 1

    run(tmp_path, scenario)


def test_callers_wait_for_one_starting_replica(tmp_path: Path) -> None:
    async def scenario(registry: FunctionRegistry) -> None:
        pool = deploy(registry, deployment("crowd", ECHO_READY_AFTER_S="0.5"))
        pids = await asyncio.gather(*(leased_pid(pool) for _ in range(5)))
        assert len(set(pids)) == 1 and pids[0] is not None
        assert starts(tmp_path, "crowd") == 1
        assert [r.pid for r in pool.replicas] == [pids[0]]

    run(tmp_path, scenario)


def test_start_failure_is_final_until_the_cooldown_or_an_update(tmp_path: Path) -> None:
    async def scenario(registry: FunctionRegistry) -> None:
        pool = deploy(registry, deployment("broken", ECHO_READY_FAIL="shard broken"))
        for _ in range(3):
            with pytest.raises(FunctionFailed, match="shard broken"):
                await leased_pid(pool)
        pool.scale(1)  # not even asked for explicitly
        assert starts(tmp_path, "broken") == 1
        assert pool.replicas == []
        await registry.update(deployment("broken"))
        assert await leased_pid(pool) is not None
        assert starts(tmp_path, "broken") == 2

    run(tmp_path, scenario, start_failure_cooldown_s=60.0)


def test_start_failure_is_tried_again_after_the_cooldown(tmp_path: Path) -> None:
    async def scenario(registry: FunctionRegistry) -> None:
        pool = deploy(registry, deployment("crashing", ECHO_EXIT_CODE="3"))
        for attempt in (1, 2):
            with pytest.raises(ReplicaUnavailable, match="exited with code 3"):
                await leased_pid(pool)
            assert starts(tmp_path, "crashing") == attempt  # a crash by itself is not retried

    run(tmp_path, scenario, start_failure_cooldown_s=0.0)


def test_idle_function_scales_to_zero(tmp_path: Path) -> None:
    async def scenario(registry: FunctionRegistry) -> None:
        pool = deploy(registry, deployment("idle", labels={LABEL_SCALE_ZERO_DURATION: "30s"}))
        async with pool.lease() as replica:
            registry.reap_once(now=time.monotonic() + 60)
            assert pool.desired == 1  # a replica serving a request is not idle
        registry.reap_once(now=time.monotonic() + 10)
        assert (pool.desired, pool.replicas) == (1, [replica])
        registry.reap_once(now=time.monotonic() + 31)
        assert (pool.desired, pool.replicas) == (0, [])
        await pool.settled()
        assert replica.has_exited() and replica.state is ReplicaState.EXITED

    run(tmp_path, scenario)


def test_redeploy_replaces_replicas(tmp_path: Path) -> None:
    async def scenario(registry: FunctionRegistry) -> None:
        pool = deploy(registry, deployment("greeter", GREETING="old"))
        async with pool.lease() as old:
            assert await get(registry, old, "/env/GREETING") == "old"
        await registry.update(deployment("greeter", GREETING="new"))
        assert old.has_exited()
        assert pool.desired == 1  # the new deployment starts as many as the old one had
        async with pool.lease() as new:
            assert new.pid != old.pid
            assert await get(registry, new, "/env/GREETING") == "new"

    run(tmp_path, scenario)


def test_replica_killed_while_starting_is_replaced_for_the_same_request(tmp_path: Path) -> None:
    async def scenario(registry: FunctionRegistry) -> None:
        pool = deploy(registry, deployment("victim", ECHO_READY_AFTER_S="1.0"))
        forwarded = asyncio.create_task(pool.forward(invocation(b"still answered")))
        await poll(lambda: bool(pool.replicas) and pool.replicas[0].pid is not None)
        first = pool.replicas[0]
        assert first.process is not None
        first.process.send_signal(signal.SIGKILL)
        response = await forwarded
        assert (response.status_code, response.body) == (200, b"still answered")
        assert starts(tmp_path, "victim") == 2
        assert first not in pool.replicas and first.has_exited()

    run(tmp_path, scenario)


def test_close_stops_every_replica_and_ends_waiting_callers(tmp_path: Path) -> None:
    async def scenario(registry: FunctionRegistry) -> None:
        warm = deploy(registry, deployment("warm"))
        slow = deploy(registry, deployment("slow", ECHO_STARTUP_DELAY_S="60"))
        warm.scale(2)
        await poll(lambda: warm.ready_count() == 2)
        waiting = asyncio.create_task(leased_pid(slow))
        await poll(lambda: bool(slow.replicas) and slow.replicas[0].pid is not None)
        replicas = warm.replicas + slow.replicas
        await registry.close()
        assert all(r.has_exited() for r in replicas)
        with pytest.raises(ReplicaUnavailable, match="deleted while the request waited"):
            await waiting
        assert registry.names() == []

    run(tmp_path, scenario)
