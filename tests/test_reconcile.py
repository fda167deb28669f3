"""The control plane reconciles: a restarted gateway, a deleted or changed function are redeployed by
`faasmoe serve --reconcile` without anyone running `faasmoe deploy`, and /ready says 200 only when the
plan can be served. Real gateway, real function processes, real HTTP; the gateway has credentials."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import ValidationError

from faasmoe.gateway.client import GatewayClient, GatewaySettings
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.planning.deploy import deploy_plan, plan_deployments
from faasmoe.planning.export import export
from faasmoe.planning.plan import Plan
from faasmoe.planning.stack import StackSettings
from faasmoe.process import free_port, wait_until
from faasmoe.server.process import ServeProcess
from faasmoe.server.reconciler import Reconciler
from faasmoe.server.settings import ServeSettings
from tests.conftest import TEST_THREADS
from tests.reference import load_reference, reference_greedy

KEY = "sk-reconcile-0001"
PROMPT = [11, 42, 7, 300, 5]
NEW_TOKENS = 6
INTERVAL_S = 0.3
DEADLINE_S = 60.0


class Credentials:
    def __init__(self) -> None:
        self.user, self.password = "faasmoe", secrets.token_urlsafe(16)

    def gateway_env(self) -> dict[str, str]:
        return os.environ | {"FAASMOE_GATEWAY_BASIC_AUTH_USER": self.user,
                             "FAASMOE_GATEWAY_BASIC_AUTH_PASSWORD": self.password}  # fmt: skip

    def serve_env(self) -> dict[str, str]:
        return os.environ | {"FAASMOE_SERVE_GATEWAY_BASIC_AUTH": f"{self.user}:{self.password}"}

    def client(self, url: str) -> GatewayClient:
        return GatewayClient(GatewaySettings.from_url(url, f"{self.user}:{self.password}"))


@pytest.fixture(scope="module")
def plan_dir(tiny_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    plan_dir = tmp_path_factory.mktemp("reconcile") / "plan"
    export(tiny_fp32, plan_dir, experts_per_function=6)  # 4 functions
    return plan_dir


@pytest.fixture(scope="module")
def tenants(plan_dir: Path) -> Path:
    path = plan_dir.parent / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": [{"name": "alpha", "api_keys": [KEY]}]}))
    return path


@pytest.fixture(scope="module")
def expected(tiny_fp32: Path) -> list[int]:
    return reference_greedy(load_reference(tiny_fp32), [PROMPT], NEW_TOKENS)[0]


class Platform:
    """A reconciling control plane over a gateway that the tests may kill and start again on its port."""

    def __init__(self, processes: contextlib.ExitStack, credentials: Credentials, log_dir: Path) -> None:
        self.processes, self.credentials, self.log_dir = processes, credentials, log_dir
        self.gateway_port = free_port()
        self.gateway = self.start_gateway()
        self.server: ServeProcess

    def start_gateway(self) -> GatewayProcess:
        log = self.log_dir / f"gateway-{secrets.token_hex(3)}.log"
        gateway = GatewayProcess(port=self.gateway_port, env=self.credentials.gateway_env(), log_path=log)
        return self.processes.enter_context(gateway)

    def ready(self) -> httpx.Response:
        return httpx.get(self.server.url + "/ready", timeout=10, trust_env=False)

    def complete(self) -> list[int]:
        body = {"model": "tiny-fp32", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        response = httpx.post(self.server.url + "/v1/completions", json=body, timeout=120, trust_env=False,
                              headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["token_ids"]

    def gateway_call(self, call):  # call(client) -> awaitable
        async def go():
            async with self.credentials.client(self.gateway.url) as client:
                return await call(client)

        return asyncio.run(go())


@pytest.fixture(scope="module")
def platform(tiny_fp32: Path, plan_dir: Path, tenants: Path):
    """No one deploys: the server's reconciler deploys the plan, so /ready (what ServeProcess waits for) is 200."""
    with contextlib.ExitStack() as processes:
        platform = Platform(processes, Credentials(), plan_dir.parent)
        args = ["--model", str(tiny_fp32), "--plan", str(plan_dir), "--tenants", str(tenants),
                "--gateway", platform.gateway.url, "--threads", str(TEST_THREADS), "--reconcile",
                "--reconcile-interval", str(INTERVAL_S)]  # fmt: skip
        server = ServeProcess(args=args, env=platform.credentials.serve_env(), log_path=plan_dir.parent / "serve.log")
        platform.server = processes.enter_context(server)
        yield platform


def test_a_restarted_gateway_is_redeployed_and_serves_exact_tokens(
    platform: Platform, plan_dir: Path, expected: list[int]
):
    assert platform.ready().status_code == 200
    assert platform.complete() == expected

    platform.gateway.process.kill()  # a crash: its functions die with it (parent-death signal)
    platform.gateway.process.wait()
    assert wait_until(lambda: platform.ready().status_code == 503, DEADLINE_S)
    assert platform.ready().json() == {"status": "not ready", "reason": "the gateway is unreachable"}

    platform.gateway = platform.start_gateway()  # same port, same credentials, no functions
    assert wait_until(lambda: platform.ready().status_code == 200, DEADLINE_S), platform.ready().text
    names = {f.name for f in platform.gateway_call(lambda client: client.list_functions())}
    assert names == {f.name for f in Plan.load(plan_dir).functions}
    assert platform.complete() == expected


def test_a_deleted_function_is_redeployed(platform: Platform, plan_dir: Path):
    name = Plan.load(plan_dir).functions[1].name
    before = platform.gateway_call(lambda client: client.get_function(name)).created_at
    assert before is not None
    platform.gateway_call(lambda client: client.delete(name))

    def deployed_again() -> bool:
        listed = {f.name: f for f in platform.gateway_call(lambda client: client.list_functions())}
        return name in listed and listed[name].created_at > before

    assert wait_until(deployed_again, DEADLINE_S)
    assert wait_until(lambda: platform.ready().status_code == 200, DEADLINE_S)


def test_a_changed_function_is_updated_back_to_the_plan(platform: Platform, plan_dir: Path):
    planned = plan_deployments(Plan.load(plan_dir), StackSettings(weights_uri=str(plan_dir), threads=TEST_THREADS))[0]
    changed = planned.model_copy(update={"env_vars": planned.env_vars | {"FAASMOE_THREADS": "3"}})
    platform.gateway_call(lambda client: client.update(changed))

    def env() -> dict[str, str]:
        return platform.gateway_call(lambda client: client.get_function(planned.service)).env_vars

    assert wait_until(lambda: env() == planned.env_vars, DEADLINE_S), env()


def test_without_reconciling_ready_says_what_is_not_deployed(tiny_fp32: Path, plan_dir: Path, tenants: Path):
    credentials = Credentials()
    log_dir = plan_dir.parent
    with GatewayProcess(env=credentials.gateway_env(), log_path=log_dir / "gateway-plain.log") as gateway:
        args = ["--model", str(tiny_fp32), "--plan", str(plan_dir), "--tenants", str(tenants),
                "--gateway", gateway.url, "--threads", str(TEST_THREADS)]  # fmt: skip
        with LiveServeProcess(args=args, env=credentials.serve_env(), log_path=log_dir / "serve-plain.log") as server:
            ready = httpx.get(server.url + "/ready", trust_env=False)
            assert ready.status_code == 503
            assert ready.json() == {"status": "not ready", "reason": "of the plan's 4 functions, 4 not deployed"}

            async def deploy() -> None:
                async with credentials.client(gateway.url) as client:
                    await deploy_plan(Plan.load(plan_dir), client, StackSettings(weights_uri=str(plan_dir)))

            asyncio.run(deploy())
            assert wait_until(lambda: httpx.get(server.url + "/ready", trust_env=False).status_code == 200, DEADLINE_S)


class LiveServeProcess(ServeProcess):
    """Started once it answers /health: its /ready is what the test checks."""

    health_path = "/health"


def test_the_reconciler_finds_and_fixes_missing_and_changed_functions(plan_dir: Path):
    plan = Plan.load(plan_dir)
    stack = StackSettings(weights_uri=str(plan_dir), threads=TEST_THREADS)
    reconciler = Reconciler(plan, stack, interval_s=INTERVAL_S)
    comparer = Reconciler(plan, None, interval_s=INTERVAL_S)
    names = tuple(f.name for f in plan.functions)
    credentials = Credentials()
    with GatewayProcess(env=credentials.gateway_env()) as gateway:

        async def go() -> None:
            async with credentials.client(gateway.url) as client:
                assert (await comparer.compare(client)).missing == names
                first = await reconciler.reconcile(client)
                assert (first.missing, first.changed) == (names, ())
                assert (await reconciler.compare(client)).problem is None

                planned = reconciler.deployments[names[0]]
                await client.update(planned.model_copy(update={"image": "another:1"}))
                assert (await reconciler.compare(client)).changed == (names[0],)
                assert (await comparer.compare(client)).problem is None  # without deployments it checks presence
                await reconciler.reconcile(client)
                assert (await client.get_function(names[0])).image == planned.image
                assert (await reconciler.compare(client)).problem is None

        asyncio.run(go())


def test_reconcile_settings_deploy_as_faasmoe_deploy_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in [name for name in os.environ if name.upper().startswith("FAASMOE_SERVE_")]:
        monkeypatch.delenv(name)
    given = {"model": tmp_path / "model", "plan": tmp_path / "plan", "tenants": tmp_path / "tenants.yaml"}
    settings = ServeSettings(**given, gateway="http://127.0.0.1:8080", reconcile=True, threads=3)
    assert settings.functions.weights_uri == str((tmp_path / "plan").resolve())  # where this control plane reads it
    assert settings.functions.threads == 3  # exactness: the trunk's thread count
    assert settings.functions.image == StackSettings().image

    monkeypatch.setenv("FAASMOE_SERVE_FUNCTIONS__IMAGE", "registry.example/expert-group:2")
    monkeypatch.setenv("FAASMOE_SERVE_FUNCTIONS__WEIGHTS_URI", "http://weights/plan")
    from_env = ServeSettings(**given, gateway="http://127.0.0.1:8080", threads=3, functions={"threads": 2})
    assert (from_env.functions.image, from_env.functions.weights_uri) == ("registry.example/expert-group:2",
                                                                         "http://weights/plan")  # fmt: skip
    assert from_env.functions.threads == 2

    with pytest.raises(ValidationError, match="reconcile needs a gateway"):
        ServeSettings(**given, reconcile=True)
