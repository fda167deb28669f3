"""The embedded gateway over real HTTP: a real gateway process running real function processes.

Functions are tests/support/echo_function.py, a small HTTP server standing in for a function
image. Each test deploys its own function names, so tests share one gateway process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from faasmoe.gateway.durations import DurationError, parse_duration
from faasmoe.gateway.embedded import EmbeddedGatewaySettings, GatewayProcess, create_app
from faasmoe.gateway.embedded.config import InsecureBindError
from faasmoe.process import free_port

ECHO_FUNCTION = Path(__file__).parent / "support" / "echo_function.py"
AUTH = ("admin", "s3cret:with-colon")
JSON = {"Content-Type": "application/json"}
# Generous bounds for a loaded 2-core machine; polls return as soon as the condition holds.
DEADLINE_S = 15.0
POLL_S = 0.05


def gateway_args(log_dir: Path, *extra: str) -> list[str]:
    return [
        "--function-command",
        f"{sys.executable} {ECHO_FUNCTION}",
        "--log-dir",
        str(log_dir),
        "--reaper-interval",
        "0.1",
        "--idle-timeout",
        "120",
        "--cold-start-timeout",
        "10",
        # The echo function's own settings, beyond the FAASMOE_* a deployment may always set.
        *("--allow-env-var", "TEST_FUNCTION", "--allow-env-var", "ECHO_*", "--allow-env-var", "GREETING"),
        *extra,
    ]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    logs = tmp_path_factory.mktemp("gateway-logs")
    args = gateway_args(logs, "--basic-auth", ":".join(AUTH))
    with GatewayProcess(args=args, log_path=logs / "gateway.log") as process:
        yield process


@pytest.fixture
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, auth=AUTH, timeout=30.0, trust_env=False) as client:
        yield client


def deploy(
    http: httpx.Client,
    name: str,
    env: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> None:
    body = {
        "service": name,
        "image": "faasmoe/echo:test",
        # The marker lets tests find this function's processes among the gateway's children.
        "envVars": {"TEST_FUNCTION": name, **(env or {})},
        "labels": labels or {},
        "annotations": {"com.openfaas.ready.http.path": "/ready"},
    }
    response = http.post("/system/functions", json=body)
    assert response.status_code == 202, response.text


def status(http: httpx.Client, name: str) -> dict:
    response = http.get(f"/system/function/{name}")
    assert response.status_code == 200, response.text
    return response.json()


def replica_pids(gateway: GatewayProcess, name: str) -> set[int]:
    pids = set()
    for process in gateway.function_processes():
        try:
            if process.environ().get("TEST_FUNCTION") == name and process.status() != psutil.STATUS_ZOMBIE:
                pids.add(process.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(POLL_S)


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def invoke_pid(http: httpx.Client, name: str) -> int:
    response = http.get(f"/function/{name}/pid")
    assert response.status_code == 200, response.text
    return int(response.text)


# --- auth and routing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/system/functions"),
        ("POST", "/system/functions"),
        ("PUT", "/system/functions"),
        ("DELETE", "/system/functions"),
        ("GET", "/system/function/any"),
        ("POST", "/system/scale-function/any"),
        ("GET", "/system/info"),
    ],
)
def test_system_routes_need_basic_auth(gateway: GatewayProcess, method: str, path: str) -> None:
    for auth in (None, ("admin", "wrong"), ("root", AUTH[1])):
        response = httpx.request(method, gateway.url + path, auth=auth, trust_env=False)
        assert response.status_code == 401, (auth, response.text)
        assert response.headers["WWW-Authenticate"].startswith("Basic")


def test_health_info_and_call_headers(http: httpx.Client) -> None:
    health = httpx.get(str(http.base_url) + "/healthz", trust_env=False)
    assert health.status_code == 200
    for header in ("X-Call-Id", "X-Start-Time", "X-Duration-Seconds"):
        assert header in health.headers
    float(health.headers["X-Duration-Seconds"])
    assert http.get("/healthz", headers={"X-Call-Id": "abc"}).headers["X-Call-Id"] == "abc"

    # faas-provider's flat ProviderInfo, which the OpenFaaS gateway reads from its provider.
    info = http.get("/system/info").json()
    assert set(info) == {"provider", "orchestration", "version"}
    assert info["provider"] == "faasmoe-embedded" and info["orchestration"]
    assert set(info["version"]) == {"sha", "release"} and info["version"]["release"]


def test_unknown_function_is_404(http: httpx.Client) -> None:
    assert http.post("/function/nope", content=b"x").status_code == 404
    assert http.get("/function/nope/some/path").status_code == 404
    assert http.get("/system/function/nope").status_code == 404
    assert http.request("DELETE", "/system/functions", json={"functionName": "nope"}).status_code == 404
    assert http.post("/system/scale-function/nope", json={"serviceName": "nope", "replicas": 1}).status_code == 404
    update = {"service": "nope", "image": "x"}
    assert http.put("/system/functions", json=update).status_code == 404


def labelled(label: str, value: str) -> bytes:
    return json.dumps({"service": "labelled", "image": "x", "labels": {label: value}}).encode()


def test_malformed_bodies_are_400_and_the_gateway_keeps_serving(http: httpx.Client) -> None:
    bad_requests = [
        ("POST", "/system/functions", b"{not json"),
        ("POST", "/system/functions", b'{"service": "no-image"}'),
        ("POST", "/system/functions", b"[1, 2]"),
        ("POST", "/system/functions", b""),
        ("POST", "/system/functions", b'{"service": "Bad_Name", "image": "x"}'),
        ("POST", "/system/functions", labelled("com.openfaas.scale.min", "a")),
        ("POST", "/system/functions", labelled("com.openfaas.scale.zero-duration", "5 min")),
        ("POST", "/system/functions", labelled("com.openfaas.scale.zero", "maybe")),
        ("PUT", "/system/functions", b"{not json"),
        ("DELETE", "/system/functions", b"{}"),
        ("POST", "/system/scale-function/any", b'{"serviceName": "any", "replicas": -1}'),
    ]
    for method, path, body in bad_requests:
        response = http.request(method, path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (body, response.status_code, response.text)
        assert response.text  # a message saying what is wrong
    assert "invalid FunctionDeployment JSON" in http.post("/system/functions", content=b"{", headers=JSON).text
    assert http.get("/healthz").status_code == 200
    deploy(http, "after-bad-input")
    assert http.post("/function/after-bad-input", content=b"ok").content == b"ok"


# --- lifecycle --------------------------------------------------------------------------------


def test_status_uses_openfaas_names_and_omits_zero_fields(http: httpx.Client) -> None:
    deploy(http, "fields", env={"GREETING": "1"}, labels={"team": "moe"})
    fresh = status(http, "fields")
    assert fresh["name"] == "fields"
    assert fresh["image"] == "faasmoe/echo:test"
    assert fresh["envVars"]["GREETING"] == "1"
    assert fresh["labels"] == {"team": "moe"}
    assert fresh["annotations"] == {"com.openfaas.ready.http.path": "/ready"}
    assert fresh["namespace"] == "openfaas-fn"
    for zero in ("replicas", "availableReplicas", "invocationCount"):
        assert zero not in fresh

    response = http.post("/function/fields", content=b"\x00binary\xff", headers={"Content-Type": "application/x-test"})
    assert response.status_code == 200
    assert response.content == b"\x00binary\xff"
    assert response.headers["content-type"] == "application/x-test"
    for header in ("X-Call-Id", "X-Start-Time", "X-Duration-Seconds"):
        assert header in response.headers
    warm = status(http, "fields")
    assert (warm["replicas"], warm["availableReplicas"], warm["invocationCount"]) == (1, 1, 1)
    assert [f["name"] for f in http.get("/system/functions").json() if f["name"] == "fields"] == ["fields"]


def test_deploy_update_delete(http: httpx.Client, gateway: GatewayProcess) -> None:
    deploy(http, "lifecycle", env={"GREETING": "hello"})
    duplicate = http.post("/system/functions", json={"service": "lifecycle", "image": "x"})
    assert duplicate.status_code == 400
    assert "already exists" in duplicate.text

    assert http.get("/function/lifecycle/env/GREETING").text == "hello"
    (old_pid,) = replica_pids(gateway, "lifecycle")

    update = {"service": "lifecycle", "image": "x:2", "envVars": {"TEST_FUNCTION": "lifecycle", "GREETING": "bye"}}
    assert http.put("/system/functions", json=update).status_code == 202
    assert pid_gone(old_pid)  # replicas restart with the new environment
    assert status(http, "lifecycle")["image"] == "x:2"
    assert http.get("/function/lifecycle/env/GREETING").text == "bye"
    (new_pid,) = replica_pids(gateway, "lifecycle")

    deleted = http.request("DELETE", "/system/functions", json={"functionName": "lifecycle"})
    assert deleted.status_code == 200
    assert pid_gone(new_pid)
    assert http.get("/system/function/lifecycle").status_code == 404
    assert http.post("/function/lifecycle", content=b"x").status_code == 404
    assert "lifecycle" not in [f["name"] for f in http.get("/system/functions").json()]


def test_scale_to_two_replicas_runs_two_processes(http: httpx.Client, gateway: GatewayProcess) -> None:
    deploy(http, "scaled")
    response = http.post("/system/scale-function/scaled", json={"serviceName": "scaled", "replicas": 2})
    assert response.status_code == 202
    wait_until(lambda: status(http, "scaled").get("availableReplicas") == 2, "two replicas are ready")
    assert status(http, "scaled")["replicas"] == 2
    pids = replica_pids(gateway, "scaled")
    assert len(pids) == 2
    # Requests spread across both replicas.
    assert {invoke_pid(http, "scaled") for _ in range(6)} == pids

    http.post("/system/scale-function/scaled", json={"serviceName": "scaled", "replicas": 1})
    wait_until(lambda: len(replica_pids(gateway, "scaled")) == 1, "one replica is left")
    assert status(http, "scaled")["replicas"] == 1


def test_scale_max_label_caps_replicas(http: httpx.Client) -> None:
    deploy(http, "capped", labels={"com.openfaas.scale.max": "1"})
    http.post("/system/scale-function/capped", json={"serviceName": "capped", "replicas": 3})
    assert status(http, "capped")["replicas"] == 1


def test_scale_from_zero_holds_concurrent_requests_on_one_replica(http: httpx.Client, gateway: GatewayProcess) -> None:
    deploy(http, "cold", env={"ECHO_STARTUP_DELAY_S": "0.5"})
    assert "replicas" not in status(http, "cold")
    results: list[httpx.Response] = []

    def call(i: int) -> None:
        with httpx.Client(base_url=gateway.url, timeout=30.0, trust_env=False) as client:
            results.append(client.post("/function/cold", content=f"request {i}".encode()))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(r.content for r in results) == [f"request {i}".encode() for i in range(5)]
    assert all(r.status_code == 200 for r in results)
    assert len({r.headers["X-Echo-Pid"] for r in results}) == 1  # one shared cold start
    assert len(replica_pids(gateway, "cold")) == 1


def test_idle_function_scales_to_zero_and_its_process_exits(http: httpx.Client, gateway: GatewayProcess) -> None:
    deploy(http, "idler", labels={"com.openfaas.scale.zero": "true", "com.openfaas.scale.zero-duration": "1s"})
    pid = invoke_pid(http, "idler")
    wait_until(lambda: pid_gone(pid), f"idle replica {pid} exits")
    idle = status(http, "idler")
    assert "replicas" not in idle and "availableReplicas" not in idle
    assert invoke_pid(http, "idler") != pid  # and it comes back on demand


def test_min_replicas_are_kept_when_idle(http: httpx.Client, gateway: GatewayProcess) -> None:
    labels = {"com.openfaas.scale.min": "1", "com.openfaas.scale.zero-duration": "200ms"}
    deploy(http, "steady", labels=labels)
    wait_until(lambda: status(http, "steady").get("availableReplicas") == 1, "the minimum replica is ready")
    (pid,) = replica_pids(gateway, "steady")
    time.sleep(0.6)  # three idle timeouts
    assert replica_pids(gateway, "steady") == {pid}


def test_killed_replica_is_replaced_on_next_invocation(http: httpx.Client) -> None:
    deploy(http, "fragile")
    pid = invoke_pid(http, "fragile")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: pid_gone(pid), "the killed replica is gone")
    response = http.post("/function/fragile", content=b"still here")
    assert response.status_code == 200, response.text
    assert response.content == b"still here"
    assert int(response.headers["X-Echo-Pid"]) != pid


def test_replica_that_crashes_on_start_gives_502_with_reason(http: httpx.Client) -> None:
    deploy(http, "crasher", env={"ECHO_EXIT_CODE": "3"})
    response = http.post("/function/crasher", content=b"x")
    assert response.status_code == 502
    assert "exited with code 3" in response.text
    assert "replicas" in status(http, "crasher")  # still wanted: started again once the failure cools down


def test_metrics_follow_openfaas_names(http: httpx.Client) -> None:
    deploy(http, "measured")
    http.post("/function/measured", content=b"x")
    text = httpx.get(str(http.base_url) + "/metrics", trust_env=False).text
    assert 'gateway_function_invocation_total{code="200",function_name="measured"} 1.0' in text
    assert 'gateway_functions_seconds_count{code="200",function_name="measured"} 1.0' in text
    assert 'gateway_service_count{function_name="measured"} 1.0' in text


# --- process lifetime and binding -------------------------------------------------------------------


def test_shutdown_stops_every_function_process(tmp_path: Path) -> None:
    with GatewayProcess(args=gateway_args(tmp_path), log_path=tmp_path / "gateway.log") as gateway:
        # No credentials: /system/* is open, which is allowed on loopback.
        with httpx.Client(base_url=gateway.url, timeout=30.0, trust_env=False) as http:
            deploy(http, "one")
            deploy(http, "two")
            pids = {invoke_pid(http, "one"), invoke_pid(http, "two")}
        assert (tmp_path / "one.log").exists()  # function output goes to per-function logs
        leftovers = gateway.stop()
    assert leftovers == []
    assert all(pid_gone(pid) for pid in pids)


def test_refuses_open_system_api_beyond_loopback() -> None:
    port = str(free_port())
    result = subprocess.run(
        [sys.executable, "-m", "faasmoe.cli", "gateway", "--host", "0.0.0.0", "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to listen on '0.0.0.0' without basic auth" in result.stderr

    with pytest.raises(InsecureBindError):
        create_app(EmbeddedGatewaySettings(host="0.0.0.0"))
    create_app(EmbeddedGatewaySettings(host="0.0.0.0", basic_auth_user="a", basic_auth_password="b"))
    create_app(EmbeddedGatewaySettings(host="::1"))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0), ("1.5s", 1.5), ("0", 0.0)],
)
def test_parse_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5 m", "m5", "-1s", "1d", "1m30"])
def test_reject_malformed_durations(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)
