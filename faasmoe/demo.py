"""The README's main job: `faasmoe up`, then three tenants send requests, and we show what happened.

Round 1 meets cold functions, round 2 warm ones; then the functions idle past their timeout and scale
to zero, and the platform's memory drops back to the control plane alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import yaml
from rich.console import Console
from rich.table import Table

from faasmoe.gateway.embedded import is_gateway, is_zygote
from faasmoe.memory import resident_memory
from faasmoe.up import UpProcess

WORKDIR = Path(".faasmoe")
IDLE_TIMEOUT_S = 8
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


def platform_state(up: psutil.Process) -> str:
    """Replicas and memory, read from the processes: the gateway's /system API is the control plane's alone."""
    processes = [up, *up.children(recursive=True)]
    gateways = [p for p in processes if is_gateway(p)]
    runtime = [p for g in gateways for p in g.children() if is_zygote(p, g.pid)]
    replicas = [p for g in gateways for p in g.children(recursive=True) if p not in runtime]
    # PSS: forked replicas share the runtime's pages, which RSS would count once per process.
    total, in_replicas, in_runtime = (sum(_pss(p) for p in group) for group in (processes, replicas, runtime))
    return (f"function replicas running {len(replicas)}; memory (PSS): all processes {total / 1e9:.2f} GB, of "
            f"which replicas {in_replicas / 1e9:.2f} GB, their shared runtime {in_runtime / 1e9:.2f} GB")  # fmt: skip


def main() -> None:
    console.rule("faasmoe demo: 3 tenants, one shared pool of expert functions")
    WORKDIR.mkdir(exist_ok=True)
    console.print(f"starting `faasmoe up` (log: {WORKDIR / UP_LOG}); the first run builds the model")
    args = ["--workdir", str(WORKDIR), "--idle-timeout", f"{IDLE_TIMEOUT_S}s"]
    # Leaving the block stops `faasmoe up` with SIGTERM, which stops everything it started.
    with UpProcess(args=args, log_path=WORKDIR / UP_LOG) as process:
        up = psutil.Process(process.pid)
        console.print(f"control plane {process.url}/v1  (OpenAI-compatible; keys in {WORKDIR / 'tenants.yaml'})")
        keys = {t["name"]: t["api_keys"][0] for t in yaml.safe_load((WORKDIR / "tenants.yaml").read_text())["tenants"]}
        console.print(platform_state(up))
        show_round("round 1: functions start cold", asyncio.run(round_of_requests(process.url, keys)))
        console.print(platform_state(up))
        show_round("round 2: functions warm", asyncio.run(round_of_requests(process.url, keys)))
        console.print(f"idle for {IDLE_TIMEOUT_S + 4} s: functions scale to zero ...")
        time.sleep(IDLE_TIMEOUT_S + 4)
        console.print(platform_state(up))


def _pss(process: psutil.Process) -> int:
    try:
        return resident_memory(process.pid).pss
    except (psutil.Error, OSError):
        return 0


if __name__ == "__main__":
    main()
