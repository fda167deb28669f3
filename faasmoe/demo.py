"""The README's main job: `faasmoe up`, then three tenants send requests, and we show what happened.

Round 1 meets cold functions, round 2 warm ones; then the functions idle past their timeout and scale
to zero, and the platform's memory drops back to the control plane alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import yaml
from rich.console import Console
from rich.table import Table

from faasmoe.gateway.embedded.ports import free_port
from faasmoe.gateway.embedded.process import GATEWAY_MODULE, is_zygote
from faasmoe.memory import resident_memory
from faasmoe.up import GATEWAY_URL_FILE

WORKDIR = Path(".faasmoe")
IDLE_TIMEOUT_S = 8
STARTUP_TIMEOUT_S = 900  # the first run builds the model
PROMPTS = {
    "alpha": "Explain what a cold start is.",
    "beta": "Write a haiku about experts.",
    "gamma": "List three uses of serverless functions.",
}
MAX_TOKENS = 24
UP_LOG = "up.log"
console = Console()


@dataclass
class Result:
    tenant: str
    tokens: int
    ttft_s: float
    total_s: float
    output: str


async def ask(client: httpx.AsyncClient, model: str, tenant: str, key: str) -> Result:
    started = time.perf_counter()
    first, pieces, ids, tokens = None, [], [], 0
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[tenant]}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"]:
                first = first or time.perf_counter()
                pieces.append(chunk["choices"][0]["delta"].get("content", ""))
                ids += chunk["choices"][0]["token_ids"]
    done = time.perf_counter()
    # Random weights pick ids all over the vocabulary, many beyond the small tokenizer's own tokens.
    output = repr("".join(pieces)[:40]) if "".join(pieces).strip() else f"ids {ids[:6]}..."
    return Result(tenant, tokens, (first or done) - started, done - started, output)


async def round_of_requests(base_url: str, keys: dict[str, str]) -> list[Result]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300, trust_env=False) as client:
        models = await client.get("/v1/models", headers={"Authorization": f"Bearer {next(iter(keys.values()))}"})
        model = models.json()["data"][0]["id"]
        return list(await asyncio.gather(*(ask(client, model, tenant, key) for tenant, key in keys.items())))


def show_round(title: str, results: list[Result]) -> None:
    table = Table(title=title)
    for column in ("tenant", "tokens", "TTFT s", "total s", "output (random weights)"):
        table.add_column(column)
    for r in results:
        table.add_row(r.tenant, str(r.tokens), f"{r.ttft_s:.2f}", f"{r.total_s:.2f}", r.output)
    console.print(table)


def platform_state(up: psutil.Process, gateway_url: str) -> str:
    functions = httpx.get(f"{gateway_url}/system/functions", timeout=10, trust_env=False).json()
    warm = sum(1 for f in functions if f.get("availableReplicas", 0) > 0)
    processes = [up, *up.children(recursive=True)]
    gateways = [p for p in processes if GATEWAY_MODULE in _cmdline(p)]
    runtime = [p for g in gateways for p in g.children() if is_zygote(p, g.pid)]
    replicas = [p for g in gateways for p in g.children(recursive=True) if p not in runtime]
    # PSS: forked replicas share the runtime's pages, which RSS would count once per process.
    total, in_replicas, in_runtime = (sum(_pss(p) for p in group) for group in (processes, replicas, runtime))
    return (f"functions warm {warm}/{len(functions)}; memory (PSS): all processes {total / 1e9:.2f} GB, of which "
            f"replicas {in_replicas / 1e9:.2f} GB, their shared runtime {in_runtime / 1e9:.2f} GB")  # fmt: skip


def main() -> None:
    port = free_port("127.0.0.1")
    command = [sys.executable, "-m", "faasmoe.cli", "up", "--port", str(port), "--workdir", str(WORKDIR),
               "--idle-timeout", f"{IDLE_TIMEOUT_S}s"]  # fmt: skip
    console.rule("faasmoe demo: 3 tenants, one shared pool of expert functions")
    WORKDIR.mkdir(exist_ok=True)
    console.print(f"starting `faasmoe up` (log: {WORKDIR / UP_LOG}); the first run builds the model")
    with (WORKDIR / UP_LOG).open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    up = psutil.Process(process.pid)
    try:
        base_url = f"http://127.0.0.1:{port}"
        _wait_ready(base_url, process)
        console.print(f"control plane {base_url}/v1  (OpenAI-compatible; keys in {WORKDIR / 'tenants.yaml'})")
        keys = {t["name"]: t["api_keys"][0] for t in yaml.safe_load((WORKDIR / "tenants.yaml").read_text())["tenants"]}
        gateway_url = (WORKDIR / GATEWAY_URL_FILE).read_text().strip()
        console.print(platform_state(up, gateway_url))
        show_round("round 1: functions start cold", asyncio.run(round_of_requests(base_url, keys)))
        console.print(platform_state(up, gateway_url))
        show_round("round 2: functions warm", asyncio.run(round_of_requests(base_url, keys)))
        console.print(f"idle for {IDLE_TIMEOUT_S + 4} s: functions scale to zero ...")
        time.sleep(IDLE_TIMEOUT_S + 4)
        console.print(platform_state(up, gateway_url))
    finally:
        _stop(process)


def _wait_ready(base_url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"faasmoe up exited with code {process.returncode}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("faasmoe up did not become ready in time")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # what Ctrl-C does: a clean shutdown of everything
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _pss(process: psutil.Process) -> int:
    try:
        return resident_memory(process.pid).pss
    except (psutil.Error, OSError):
        return 0


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


if __name__ == "__main__":
    main()
