"""Each failure means one thing, at once: a load failure is a final 500, a crash a final 502, an
over-size body a 413 before anything is buffered or started. Real gateway and function processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from faasmoe.gateway import FunctionDeployment, GatewayClient, GatewayError, GatewaySettings, RetryPolicy
from faasmoe.gateway.embedded import GatewayProcess
from tests.test_gateway_api import ECHO_FUNCTION, replica_pids, wait_until

LOAD_ERROR = "shard functions/moe-l0-g0.safetensors: sha256 mismatch"
BODY_LIMIT = 4096
# Long, as in production: a test that waited for it would take minutes, not the seconds asserted.
COLD_START_TIMEOUT_S = 120
FAST_RETRY = RetryPolicy(attempts=4, base_delay_s=0.01, max_delay_s=0.05)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    logs = tmp_path_factory.mktemp("failures-gateway")
    args = ["--function-command", f"{sys.executable} {ECHO_FUNCTION}", "--log-dir", str(logs),
            "--cold-start-timeout", str(COLD_START_TIMEOUT_S), "--max-body-bytes", str(BODY_LIMIT),
            "--allow-env-var", "TEST_FUNCTION", "--allow-env-var", "ECHO_*"]  # fmt: skip
    with GatewayProcess(args=args, log_path=logs / "gateway.log") as process:
        yield process


@pytest.fixture
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60.0, trust_env=False) as client:
        yield client


def deploy(http: httpx.Client, name: str, method: str = "POST", **env: str) -> None:
    body = {"service": name, "image": "echo", "envVars": {"TEST_FUNCTION": name, **env}}
    response = http.request(method, "/system/functions", json=body)
    assert response.status_code == 202, response.text


def starts(gateway: GatewayProcess, name: str) -> int:
    """How many replicas of ``name`` the gateway has started: one line each in the function's log."""
    return (gateway.log_path.parent / f"{name}.log").read_text().count("starting replica")


def metric(gateway: GatewayProcess, name: str, code: int) -> float:
    prefix = f'gateway_function_invocation_total{{code="{code}",function_name="{name}"}} '
    for line in httpx.get(gateway.url + "/metrics", trust_env=False).text.splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    return 0.0


def test_a_load_failure_is_a_500_at_once_and_final(http: httpx.Client, gateway: GatewayProcess) -> None:
    deploy(http, "bad-shard", ECHO_READY_FAIL=LOAD_ERROR)
    started = time.monotonic()
    response = http.post("/function/bad-shard", content=b"x")
    assert time.monotonic() - started < 5, "waited for the cold-start timeout"
    assert response.status_code == 500
    assert response.text == f"function 'bad-shard' failed to load: {LOAD_ERROR}"
    assert str(gateway.log_path.parent) not in response.text  # nothing of the gateway's machine
    wait_until(lambda: not replica_pids(gateway, "bad-shard"), "the failed replica is stopped")

    # Within the cooldown the same answer comes without starting the function again (no restart loop).
    for _ in range(3):
        again = http.post("/function/bad-shard", content=b"x")
        assert (again.status_code, again.text) == (500, response.text)
    assert starts(gateway, "bad-shard") == 1

    # An update (a fixed deployment) is tried at once.
    deploy(http, "bad-shard", method="PUT")
    fixed = http.post("/function/bad-shard", content=b"fixed")
    assert (fixed.status_code, fixed.content) == (200, b"fixed")
    assert starts(gateway, "bad-shard") == 2


def test_a_replica_that_crashes_before_ready_is_a_502_at_once(http: httpx.Client, gateway: GatewayProcess) -> None:
    deploy(http, "crash-on-start", ECHO_EXIT_CODE="3")
    started = time.monotonic()
    response = http.post("/function/crash-on-start", content=b"x")
    assert time.monotonic() - started < 5
    assert response.status_code == 502
    assert response.text == "function 'crash-on-start': replica exited with code 3 before it was ready"
    assert http.post("/function/crash-on-start", content=b"x").status_code == 502
    assert starts(gateway, "crash-on-start") == 1


def test_the_client_retries_busy_and_starting_only(gateway: GatewayProcess) -> None:
    async def scenario() -> None:
        settings = GatewaySettings(base_url=gateway.url, trust_env=False, retry=FAST_RETRY)
        async with GatewayClient(settings) as client:
            for name, env in (("client-load-fail", {"ECHO_READY_FAIL": LOAD_ERROR}),
                              ("client-crash", {"ECHO_EXIT_CODE": "4"}),
                              ("client-watchdog", {"ECHO_WATCHDOG_500_FIRST": "2"})):  # fmt: skip
                await client.deploy(FunctionDeployment(service=name, image="echo", env_vars=env))
            with pytest.raises(GatewayError) as failed:
                await client.invoke("client-load-fail", b"x")
            assert failed.value.status == 500 and LOAD_ERROR in failed.value.body
            with pytest.raises(GatewayError) as crashed:
                await client.invoke("client-crash", b"x")
            assert crashed.value.status == 502
            # of-watchdog's own 500 (its function server not up yet, as on OpenFaaS CE) is "starting".
            response = await client.invoke("client-watchdog", b"eventually")
            assert response.content == b"eventually"

    asyncio.run(scenario())
    assert metric(gateway, "client-load-fail", 500) == 1  # one try: not retried
    assert metric(gateway, "client-crash", 502) == 1
    assert metric(gateway, "client-watchdog", 500) == 2 and metric(gateway, "client-watchdog", 200) == 1


def test_over_size_bodies_get_413_before_a_replica_starts(http: httpx.Client, gateway: GatewayProcess) -> None:
    deploy(http, "limited")
    declared = http.post("/function/limited", content=b"x" * (BODY_LIMIT + 1))
    assert declared.status_code == 413 and str(BODY_LIMIT) in declared.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b"y" * 1024

    streamed = http.post("/function/limited", content=chunks())
    assert streamed.status_code == 413
    assert "replicas" not in http.get("/system/function/limited").json()  # nothing was started for them
    assert http.post("/function/limited", content=b"z" * BODY_LIMIT).content == b"z" * BODY_LIMIT

    huge = {"service": "huge", "image": "x", "labels": {"pad": "p" * (2 << 20)}}
    assert http.post("/system/functions", json=huge).status_code == 413
    assert http.get("/healthz").status_code == 200


def test_a_replica_killed_while_starting_is_started_again_for_the_same_request(
    http: httpx.Client, gateway: GatewayProcess
) -> None:
    # Killed from outside (a signal, the zygote's death, the OOM killer): not the function's failure.
    deploy(http, "killed-starting", ECHO_STARTUP_DELAY_S="1.0")
    answers: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: answers.append(http.post("/function/killed-starting", content=b"ok")))
    caller.start()
    wait_until(lambda: bool(replica_pids(gateway, "killed-starting")), "the replica is starting")
    (first,) = replica_pids(gateway, "killed-starting")
    os.kill(first, signal.SIGKILL)
    caller.join(timeout=60)
    (answer,) = answers
    assert (answer.status_code, answer.content) == (200, b"ok")
    assert int(answer.headers["X-Echo-Pid"]) != first
    assert starts(gateway, "killed-starting") == 2
