"""The embedded gateway runs no command it was not configured with, and tells functions no secret.

Real gateway processes running tests/support/echo_function.py (see test_gateway_api.py); each test
reproduces an attack of issue 14 and shows it refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from faasmoe.gateway.embedded import EmbeddedGatewaySettings, GatewayProcess, create_app
from faasmoe.gateway.embedded.config import DEFAULT_ENV_PASSTHROUGH, InsecureBindError, matches
from faasmoe.process import free_port
from tests.test_gateway_api import ECHO_FUNCTION

AUTH = ("operator", "gateway-secret-7f3a")
SECRET_ENV = {"FAASMOE_GATEWAY_BASIC_AUTH_USER": AUTH[0], "FAASMOE_GATEWAY_BASIC_AUTH_PASSWORD": AUTH[1]}


def echo_args(log_dir: Path, *extra: str) -> list[str]:
    return ["--function-command", f"{sys.executable} {ECHO_FUNCTION}", "--log-dir", str(log_dir),
            "--cold-start-timeout", "10", "--allow-env-var", "TEST_FUNCTION", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def open_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """No credentials: loopback only, as `faasmoe gateway` runs by default."""
    logs = tmp_path_factory.mktemp("open-gateway")
    with GatewayProcess(args=echo_args(logs), log_path=logs / "gateway.log") as gateway:
        yield gateway


@pytest.fixture
def http(open_gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=open_gateway.url, timeout=30.0, trust_env=False) as client:
        yield client


def evil_deployment(name: str, marker: Path) -> dict:
    return {"service": name, "image": "x", "envProcess": f"sh -c 'id > {marker}'"}


# --- no command runs without credentials ---------------------------------------------------------


def test_cross_site_text_plain_deploy_is_refused(http: httpx.Client, tmp_path: Path) -> None:
    # Issue 14's reproduction: a web page's "simple" request, which needs no CORS preflight.
    marker = tmp_path / "pwned"
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        response = http.post(
            "/system/functions",
            json=evil_deployment("evil", marker),
            headers={"Content-Type": content_type, "Origin": "http://evil.example"},
        )
        assert response.status_code == 415, (content_type, response.text)
    assert http.post("/system/functions", content=b'{"service": "evil", "image": "x"}').status_code == 415
    assert http.post("/function/evil", content=b"x").status_code == 404
    assert not marker.exists()


def test_env_process_is_off_unless_the_operator_enables_it(http: httpx.Client, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    response = http.post("/system/functions", json=evil_deployment("evil", marker))
    assert response.status_code == 400
    assert "envProcess is disabled" in response.text and "--allow-env-process" in response.text
    assert http.post("/function/evil", content=b"x").status_code == 404
    # Nor can an update add one to a deployed function.
    assert http.post("/system/functions", json={"service": "benign", "image": "x"}).status_code == 202
    assert http.put("/system/functions", json=evil_deployment("benign", marker)).status_code == 400
    assert "envProcess" not in http.get("/system/function/benign").json()
    assert http.post("/function/benign", content=b"x").content == b"x"
    assert not marker.exists()


def test_dns_rebinding_host_is_refused_on_an_open_gateway(http: httpx.Client) -> None:
    # A page that made its own name resolve to 127.0.0.1 is same-origin; its Host header still names it.
    for host in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example", "[::1"):
        response = http.get("/system/functions", headers={"Host": host})
        assert response.status_code == 403, (host, response.text)
        body = {"service": "rebound", "image": "x"}
        assert http.post("/system/functions", json=body, headers={"Host": host}).status_code == 403
    assert http.get("/system/function/rebound").status_code == 404
    for host in ("127.0.0.1", f"localhost:{http.base_url.port}", "[::1]:80"):
        assert http.get("/system/functions", headers={"Host": host}).status_code == 200, host
    assert http.get("/healthz", headers={"Host": "evil.example"}).status_code == 200


@pytest.mark.parametrize(
    "name", ["LD_PRELOAD", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONWARNINGS", "BROWSER", "PATH", "BASH_ENV"]
)
def test_env_vars_that_can_run_code_are_refused(http: httpx.Client, name: str) -> None:
    body = {"service": "env-vars", "image": "x", "envVars": {name: "/tmp/evil"}}
    response = http.post("/system/functions", json=body)
    assert response.status_code == 400, response.text
    assert name in response.text and "--allow-env-var" in response.text


def test_function_settings_and_thread_counts_are_allowed(http: httpx.Client) -> None:
    env = {"TEST_FUNCTION": "allowed-env", "FAASMOE_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert (
        http.post("/system/functions", json={"service": "allowed-env", "image": "x", "envVars": env}).status_code == 202
    )
    assert http.get("/function/allowed-env/env/OMP_NUM_THREADS").text == "1"
    for bad in ({"A=B": "1"}, {"FAASMOE_X": "nul\x00byte"}, {"FAASMOE_X\n": "1"}):
        body = {"service": "bad-env", "image": "x", "envVars": bad}
        assert http.post("/system/functions", json=body).status_code == 400, bad


def test_env_process_needs_credentials_at_startup() -> None:
    with pytest.raises(InsecureBindError, match="--allow-env-process"):
        create_app(EmbeddedGatewaySettings(allow_env_process=True))
    create_app(EmbeddedGatewaySettings(allow_env_process=True, basic_auth_user="a", basic_auth_password="b"))
    result = subprocess.run(
        [sys.executable, "-m", "faasmoe.cli", "gateway", "--port", str(free_port()), "--allow-env-process"],
        capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items() if k not in SECRET_ENV},
    )  # fmt: skip
    assert result.returncode == 2
    assert "refusing --allow-env-process without basic auth" in result.stderr


def test_an_operator_who_trusts_deployers_can_enable_env_process(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    args = [*echo_args(tmp_path), "--allow-env-process"]
    # Credentials from the environment, as `faasmoe up` passes them.
    with GatewayProcess(args=args, env={**os.environ, **SECRET_ENV}, log_path=tmp_path / "gateway.log") as gateway:
        with httpx.Client(base_url=gateway.url, auth=AUTH, timeout=30.0, trust_env=False) as http:
            assert http.get("/system/functions", auth=None).status_code == 401
            command = f"sh -c 'echo ran > {marker}; exec {sys.executable} {ECHO_FUNCTION}'"
            body = {"service": "trusted", "image": "x", "envProcess": command, "envVars": {"ECHO_ANY": "1"}}
            assert http.post("/system/functions", json=body).status_code == 202
            assert http.post("/function/trusted", content=b"hi").content == b"hi"
    assert marker.read_text() == "ran\n"


# --- functions get a minimal, explicit environment ------------------------------------------------


def test_replicas_inherit_no_gateway_secret(tmp_path: Path) -> None:
    env = {**os.environ, **SECRET_ENV, "UNLISTED_GATEWAY_VARIABLE": "not for functions", "LC_TIME": "C"}
    with GatewayProcess(args=echo_args(tmp_path), env=env, log_path=tmp_path / "gateway.log") as gateway:
        with httpx.Client(base_url=gateway.url, auth=AUTH, timeout=30.0, trust_env=False) as http:
            body = {"service": "minimal", "image": "x", "envVars": {"TEST_FUNCTION": "minimal"}}
            assert http.post("/system/functions", json=body).status_code == 202
            for name in (*SECRET_ENV, "UNLISTED_GATEWAY_VARIABLE"):
                assert http.get(f"/function/minimal/env/{name}").status_code == 404, name
            assert http.get("/function/minimal/env/PATH").text == os.environ["PATH"]
            assert http.get("/function/minimal/env/LC_TIME").text == "C"
            (replica,) = gateway.function_processes()
            environ = replica.environ()
    assert AUTH[1] not in "\n".join(f"{name}={value}" for name, value in environ.items())
    assert environ["TEST_FUNCTION"] == "minimal" and environ["FAASMOE_PORT"]
    deployed = {"TEST_FUNCTION", "FAASMOE_HOST", "FAASMOE_PORT"}
    assert all(matches(name, DEFAULT_ENV_PASSTHROUGH) for name in set(environ) - deployed), sorted(environ)
