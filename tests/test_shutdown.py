"""SIGTERM ends `faasmoe serve` and `faasmoe gateway` as Ctrl-C does: in-flight requests drain, exit code 0,
and no process of theirs is left; a service whose parent was SIGKILLed stops too (parent-death signal).
(`faasmoe up` is tests/test_up.py.) Real processes, real functions, real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from faasmoe.gateway.client import GatewayClient, GatewaySettings
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.planning.deploy import deploy_plan
from faasmoe.planning.export import export
from faasmoe.planning.plan import Plan
from faasmoe.planning.stack import StackSettings
from faasmoe.process import running, wait_until
from faasmoe.server.process import ServeProcess
from tests.conftest import TEST_THREADS
from tests.reference import load_reference, reference_greedy

KEY = "sk-shutdown-0001"
PROMPT = [5, 9, 120, 33]
NEW_TOKENS = 64  # long enough to be in flight when SIGTERM arrives
SHUTDOWN_GRACE_S = 120  # long enough for the stream to finish on a busy machine
EXIT_S = 60.0  # for a process to exit after SIGTERM
GONE_S = 30.0  # for its descendants to follow


@pytest.fixture(scope="module")
def plan_dir(tiny_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    plan_dir = tmp_path_factory.mktemp("shutdown") / "plan"
    export(tiny_fp32, plan_dir, experts_per_function=6)  # 4 functions
    return plan_dir


def deploy_and_warm(gateway_url: str, plan_dir: Path) -> None:
    """Every function of the plan deployed and one replica of each started (its /ready through the gateway)."""
    plan = Plan.load(plan_dir)

    async def go() -> None:
        async with GatewayClient(GatewaySettings(base_url=gateway_url)) as client:
            await deploy_plan(plan, client, StackSettings(weights_uri=str(plan_dir), threads=TEST_THREADS))
            for function in plan.functions:
                response = await client.invoke(function.name, path="ready", method="GET")
                assert response.status_code == 200

    asyncio.run(go())


def tree_of(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def assert_all_gone(tree: list[psutil.Process]) -> None:
    """No process of ``tree`` is left within GONE_S (those left are killed, and named by the failure)."""
    wait_until(lambda: not any(running(p) for p in tree), GONE_S)
    alive = [p for p in tree if running(p)]
    for process in alive:
        process.kill()
    assert [process.pid for process in alive] == []


def test_sigterm_drains_serve_then_stops_the_gateway_and_its_functions(tiny_fp32: Path, plan_dir: Path):
    expected = reference_greedy(load_reference(tiny_fp32), [PROMPT], NEW_TOKENS)[0]
    tenants = plan_dir.parent / "tenants.yaml"
    tenants.write_text(yaml.safe_dump({"tenants": [{"name": "alpha", "api_keys": [KEY]}]}))
    with GatewayProcess(log_path=plan_dir.parent / "gateway.log") as gateway:
        deploy_and_warm(gateway.url, plan_dir)
        args = ["--model", str(tiny_fp32), "--plan", str(plan_dir), "--tenants", str(tenants),
                "--gateway", gateway.url, "--threads", str(TEST_THREADS)]  # fmt: skip
        env = os.environ | {"FAASMOE_SERVE_SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S)}
        with ServeProcess(args=args, env=env, log_path=plan_dir.parent / "serve.log") as server:
            body = {"model": "tiny-fp32", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True, "stream": True}  # fmt: skip
            headers = {"Authorization": f"Bearer {KEY}"}
            url = server.url + "/v1/completions"
            with httpx.stream("POST", url, json=body, headers=headers, timeout=120, trust_env=False) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                events = [next(line for line in lines if line.startswith("data: "))]
                server.process.send_signal(signal.SIGTERM)
                events += [line for line in lines if line.startswith("data: ")]
            assert server.process.wait(EXIT_S) == 0
        assert "Waiting for connections to close" in server.log_tail(), "the stream was in flight at shutdown"
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(event[len("data: ") :])["choices"][0] for event in events[:-1]]
        assert [token for chunk in chunks for token in chunk["token_ids"]] == expected

        tree = tree_of(gateway.pid)
        assert gateway.function_processes(), "functions are running under the gateway"
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(EXIT_S) == 0
        assert_all_gone(tree)


# A parent that starts a gateway, prints where it is, and waits to be killed.
PARENT = """
import sys, time
from pathlib import Path
from faasmoe.gateway.embedded import GatewayProcess
gateway = GatewayProcess(log_path=Path(sys.argv[1]))
gateway.start()
print(gateway.url, gateway.pid, flush=True)
time.sleep(600)
"""


def test_a_gateway_whose_parent_is_killed_stops_with_its_functions(plan_dir: Path, tmp_path: Path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "gateway.log")], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)  # fmt: skip
    tree: list[psutil.Process] = []
    try:
        url, pid = parent.stdout.readline().split()
        deploy_and_warm(url, plan_dir)
        tree = tree_of(int(pid))
        assert len(tree) >= 3, "the gateway, its function runtime and replicas"
        parent.kill()  # no chance to stop anything: only the parent-death signal reaches the gateway
        parent.wait()
        assert_all_gone(tree)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for process in tree:
            if process.is_running():
                process.kill()
