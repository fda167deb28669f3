"""GatewayClient against a real embedded gateway process running real function processes."""

from __future__ import annotations

import asyncio
import email.utils
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from faasmoe.gateway import (
    FunctionDeployment,
    FunctionNotFound,
    FunctionStatus,
    GatewayClient,
    GatewayError,
    GatewaySettings,
    RetryPolicy,
)
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.process import free_port

ECHO_FUNCTION = Path(__file__).parent / "support" / "echo_function.py"
USER, PASSWORD = "faasmoe", "client-test"
# Short delays keep retry tests fast; the bounds are what is under test.
FAST_RETRY = RetryPolicy(attempts=4, base_delay_s=0.01, max_delay_s=0.05)

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    logs = tmp_path_factory.mktemp("client-gateway")
    args = [
        "--function-command",
        f"{sys.executable} {ECHO_FUNCTION}",
        "--log-dir",
        str(logs),
        "--basic-auth",
        f"{USER}:{PASSWORD}",
        "--cold-start-timeout",
        "10",
        *("--allow-env-var", "GREETING", "--allow-env-var", "ECHO_*"),
    ]
    with GatewayProcess(args=args, log_path=logs / "gateway.log") as process:
        yield process


def settings(gateway: GatewayProcess, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {"base_url": gateway.url, "username": USER, "password": PASSWORD, "retry": FAST_RETRY}
    return GatewaySettings(**(values | overrides))


def echo(name: str, **env: str) -> FunctionDeployment:
    return FunctionDeployment(service=name, image="faasmoe/echo:test", env_vars=env, labels={"app": "echo"})


def test_deploy_list_invoke_update_delete(gateway: GatewayProcess) -> None:
    async def scenario() -> None:
        async with GatewayClient(settings(gateway)) as client:
            assert await client.healthz()
            await client.deploy(echo("flow", GREETING="hi"))

            listed = {f.name: f for f in await client.list_functions()}
            fresh = listed["flow"]
            # The gateway omits zero fields; the client reads them as 0.
            assert (fresh.replicas, fresh.available_replicas, fresh.invocation_count) == (0, 0, 0)
            assert fresh.env_vars == {"GREETING": "hi"} and fresh.labels == {"app": "echo"}

            response = await client.invoke("flow", b"payload", headers={"Content-Type": "application/x-moe"})
            assert response.content == b"payload"
            assert response.headers["content-type"] == "application/x-moe"
            assert (await client.invoke("flow", method="GET", path="env/GREETING")).text == "hi"

            # Counts the gateway does send, now that they are not 0.
            status = await client.get_function("flow")
            assert (status.replicas, status.available_replicas, status.invocation_count) == (1, 1, 2)

            await client.update(echo("flow", GREETING="bye"))
            assert (await client.invoke("flow", method="GET", path="env/GREETING")).text == "bye"

            await client.delete("flow")
            with pytest.raises(FunctionNotFound):
                await client.get_function("flow")

    run(scenario())


def test_not_found_and_other_errors_are_clear(gateway: GatewayProcess) -> None:
    async def scenario() -> None:
        async with GatewayClient(settings(gateway)) as client:
            with pytest.raises(FunctionNotFound, match="'ghost' not found"):
                await client.get_function("ghost")
            with pytest.raises(FunctionNotFound):
                await client.invoke("ghost", b"x")
            with pytest.raises(FunctionNotFound):
                await client.delete("ghost")
            unchecked = await client.invoke("ghost", b"x", check=False)
            assert unchecked.status_code == 404

            await client.deploy(echo("twice"))
            with pytest.raises(GatewayError, match="already exists") as duplicate:
                await client.deploy(echo("twice"))
            assert duplicate.value.status == 400

        async with GatewayClient(settings(gateway, password="wrong")) as intruder:
            with pytest.raises(GatewayError) as denied:
                await intruder.list_functions()
            assert denied.value.status == 401

    run(scenario())


def test_retries_503_from_a_busy_function(gateway: GatewayProcess) -> None:
    async def scenario() -> None:
        async with GatewayClient(settings(gateway)) as client:
            await client.deploy(echo("busy-once", ECHO_FAIL_FIRST="2"))
            response = await client.invoke("busy-once", b"eventually")
            assert response.status_code == 200 and response.content == b"eventually"

            await client.deploy(echo("busy-always", ECHO_FAIL_FIRST="1000"))
            started = time.monotonic()
            with pytest.raises(GatewayError) as exhausted:
                await client.invoke("busy-always", b"x")
            assert exhausted.value.status == 503
            assert time.monotonic() - started < 10  # bounded: attempts x capped delays (+ a cold start)

    run(scenario())
    metrics = httpx.get(gateway.url + "/metrics", trust_env=False).text
    assert 'gateway_function_invocation_total{code="503",function_name="busy-once"} 2.0' in metrics
    assert 'gateway_function_invocation_total{code="503",function_name="busy-always"} 4.0' in metrics


def test_connection_errors_are_retried_then_reported() -> None:
    closed = f"http://127.0.0.1:{free_port()}"

    async def scenario() -> None:
        policy = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.02)
        async with GatewayClient(GatewaySettings(base_url=closed, retry=policy)) as client:
            assert not await client.healthz()
            started = time.monotonic()
            with pytest.raises(GatewayError, match="unreachable after 3 tries") as error:
                await client.list_functions()
            assert error.value.status is None
            assert time.monotonic() - started < 5

    run(scenario())


def test_retry_delays_are_bounded_and_honour_retry_after() -> None:
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0, max_retry_after_s=5.0)
    for attempt in range(10):
        assert 0 < policy.delay(attempt) <= 1.0
    assert policy.delay(0, "2") == 2.0
    assert policy.delay(0, "3600") == 5.0  # a server's wish is capped too
    in_three_s = email.utils.formatdate(time.time() + 3, usegmt=True)
    assert 1.5 < policy.delay(0, in_three_s) <= 3.0
    assert policy.delay(0, "garbage") <= 0.1


def test_status_schema_round_trip() -> None:
    wire = {"name": "f", "image": "i", "labels": None, "envVars": None, "invocationCount": 7.0}
    status = FunctionStatus.model_validate(wire)
    assert (status.replicas, status.available_replicas, status.invocation_count) == (0, 0, 7)
    assert status.labels == {} and status.env_vars == {}
    assert status.to_wire() == {"name": "f", "image": "i", "invocationCount": 7}
    busy = FunctionStatus(name="f", image="i", replicas=2, available_replicas=1)
    assert busy.to_wire() == {"name": "f", "image": "i", "replicas": 2, "availableReplicas": 1}
    deployment = FunctionDeployment(service="f", image="i", env_vars={"A": "1"})
    assert deployment.to_wire() == {"service": "f", "image": "i", "envVars": {"A": "1"}}
