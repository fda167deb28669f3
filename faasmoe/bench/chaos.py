"""Mixed traffic under faults, every answer checked against known tokens: the reliability harness.

Closed-loop clients of several tenants ask for greedy completions (streamed and whole) whose tokens are
known in advance, while a fault injector kills function replicas, the function runtime (zygote) or the
whole gateway, which it then restarts on the same port. Every request ends as exactly one Outcome:

    ok     HTTP 200 with exactly the expected tokens
    wrong  HTTP 200 with other tokens (or an unreadable body): the one outcome a platform must never give
    error  an HTTP error status, or an error event in the stream: answered, the client knows it failed
    lost   the connection broke, or a stream ended without its [DONE]
    hung   no answer within the request deadline

Used by tests/test_faults.py (bounded, in CI) and benchmarks/soak.py (ten minutes and more).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import random
import secrets
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import yaml

from faasmoe.gateway.embedded import GatewayProcess, is_zygote
from faasmoe.server.process import ServeProcess
from faasmoe.up import GATEWAY_PASSWORD_VARIABLE, GATEWAY_USER_VARIABLE

_SSE_DATA = "data:"
_SSE_DONE = "[DONE]"
_VICTIM_POLL_S = 0.1


class Outcome(str, enum.Enum):
    OK = "ok"
    WRONG = "wrong"
    ERROR = "error"
    LOST = "lost"
    HUNG = "hung"


class Fault(str, enum.Enum):
    KILL_REPLICA = "kill-replica"
    KILL_ZYGOTE = "kill-zygote"
    RESTART_GATEWAY = "restart-gateway"


@dataclass(frozen=True)
class Probe:
    """A prompt and the greedy tokens it must produce."""

    prompt_ids: list[int]
    tokens: list[int]


@dataclass(frozen=True)
class Tenant:
    name: str
    api_key: str


@dataclass
class Tally:
    """What happened to every request, and which faults were injected."""

    outcomes: Counter[Outcome] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)  # HTTP status of every answered request
    faults: Counter[Fault] = field(default_factory=Counter)
    examples: dict[Outcome, str] = field(default_factory=dict)  # the first of each bad outcome, for the report
    last_fault: Fault | None = None
    last_fault_at: float | None = None  # time.monotonic()
    ok_after_last_fault: int = 0
    # Bad outcomes by the fault injected last before them: which kind of crash costs requests.
    bad_after: Counter[Fault] = field(default_factory=Counter)

    def record(self, outcome: Outcome, status: int | None, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        if status is not None:
            self.statuses[status] += 1
        if outcome is not Outcome.OK:
            self.examples.setdefault(outcome, detail[:300])
            if self.last_fault is not None:
                self.bad_after[self.last_fault] += 1
        elif self.last_fault_at is not None:
            self.ok_after_last_fault += 1

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)

    def summary(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            **{outcome.value: self.outcomes[outcome] for outcome in Outcome},
            "5xx": self.server_errors,
            "statuses": {str(status): count for status, count in sorted(self.statuses.items())},
            "faults": {fault.value: count for fault, count in sorted(self.faults.items())},
            "ok_after_last_fault": self.ok_after_last_fault,
            "not_ok_by_last_fault": {fault.value: count for fault, count in sorted(self.bad_after.items())},
            "examples": {outcome.value: text for outcome, text in self.examples.items()},
        }


@dataclass
class Traffic:
    """Closed-loop clients: each sends one request, checks it, and sends the next."""

    base_url: str
    model: str
    tenants: Sequence[Tenant]
    probes: Sequence[Probe]
    request_timeout_s: float = 120.0

    async def run(self, clients: int, until: Callable[[], bool], tally: Tally, seed: int = 0) -> None:
        """Runs ``clients`` loops until ``until()`` is true; every request started is also finished."""
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=self.base_url, limits=limits, trust_env=False, timeout=None) as http:
            await asyncio.gather(*(self._loop(http, until, tally, random.Random(seed + i)) for i in range(clients)))

    async def round(self, tally: Tally) -> None:
        """Every probe once, for every tenant, one after another (a check before or after faults)."""
        async with httpx.AsyncClient(base_url=self.base_url, trust_env=False, timeout=None) as http:
            for tenant in self.tenants:
                for probe in self.probes:
                    tally.record(*await self.one(http, tenant, probe, stream=False))

    async def _loop(self, http: httpx.AsyncClient, until: Callable[[], bool], tally: Tally, rng: random.Random) -> None:
        while not until():
            tenant, probe = rng.choice(self.tenants), rng.choice(self.probes)
            tally.record(*await self.one(http, tenant, probe, stream=rng.random() < 0.5))

    async def one(
        self, http: httpx.AsyncClient, tenant: Tenant, probe: Probe, stream: bool
    ) -> tuple[Outcome, int | None, str]:
        """One request and its verdict: (outcome, HTTP status if answered, detail)."""
        body = {
            "model": self.model,
            "prompt": probe.prompt_ids,
            "max_tokens": len(probe.tokens),
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
            "stream": stream,
        }
        headers = {"Authorization": f"Bearer {tenant.api_key}"}

        async def send() -> tuple[Outcome, int | None, str]:
            async with http.stream("POST", "/v1/completions", json=body, headers=headers) as response:
                if response.status_code != httpx.codes.OK:
                    text = (await response.aread()).decode(errors="replace")
                    return Outcome.ERROR, response.status_code, f"HTTP {response.status_code}: {text}"
                if stream:
                    return await _verdict_of_stream(response, probe)
                return _verdict_of_body(await response.aread(), probe)

        try:
            return await asyncio.wait_for(send(), self.request_timeout_s)
        except asyncio.TimeoutError:
            return Outcome.HUNG, None, f"no answer within {self.request_timeout_s:g} s"
        except httpx.HTTPError as exc:
            return Outcome.LOST, None, f"{type(exc).__name__}: {exc}"


def _verdict_of_body(raw: bytes, probe: Probe) -> tuple[Outcome, int, str]:
    try:
        tokens = json.loads(raw)["choices"][0]["token_ids"]
    except (ValueError, KeyError, IndexError, TypeError):
        return Outcome.WRONG, 200, f"unreadable body: {raw[:200]!r}"
    return _compare(tokens, probe)


async def _verdict_of_stream(response: httpx.Response, probe: Probe) -> tuple[Outcome, int, str]:
    tokens: list[int] = []
    async for line in response.aiter_lines():
        if not line.startswith(_SSE_DATA):
            continue
        data = line[len(_SSE_DATA) :].strip()
        if data == _SSE_DONE:
            return _compare(tokens, probe)
        chunk = json.loads(data)
        if "error" in chunk:
            # The status line said 200 before the failure: the error event is the answer.
            return Outcome.ERROR, 200, f"error event: {chunk['error']}"
        for choice in chunk.get("choices") or []:
            tokens += choice.get("token_ids") or []
    return Outcome.LOST, None, f"stream ended without [DONE] after {len(tokens)} tokens"


def _compare(tokens: list[int], probe: Probe) -> tuple[Outcome, int, str]:
    if tokens == probe.tokens:
        return Outcome.OK, 200, ""
    return Outcome.WRONG, 200, f"prompt {probe.prompt_ids[:8]}: got {tokens}, expected {probe.tokens}"


class FaultInjector:
    """Kills what a crash would kill, on the real processes of one embedded gateway."""

    def __init__(self, gateway: GatewayProcess, tally: Tally, rng: random.Random | None = None) -> None:
        self.gateway = gateway
        self.tally = tally
        self.rng = rng or random.Random(0)

    async def run(self, schedule: Sequence[tuple[float, Fault]], victim_wait_s: float = 60.0) -> None:
        """Injects each (seconds from now, fault) in order; a kill waits for something to kill."""
        start = time.monotonic()
        for at_s, fault in schedule:
            await asyncio.sleep(max(0.0, start + at_s - time.monotonic()))
            deadline = time.monotonic() + victim_wait_s
            while not await self.inject(fault):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{fault.value}: nothing to kill within {victim_wait_s:g} s")
                await asyncio.sleep(_VICTIM_POLL_S)

    async def inject(self, fault: Fault) -> bool:
        """Injects ``fault``; False if there was nothing to kill (no replica running, say)."""
        if fault is Fault.RESTART_GATEWAY:
            await self.restart_gateway()
        else:
            victims = self._zygotes() if fault is Fault.KILL_ZYGOTE else self.gateway.function_processes()
            if not victims:
                return False
            _kill(self.rng.choice(victims))
        self.tally.faults[fault] += 1
        self.tally.last_fault = fault
        self.tally.last_fault_at = time.monotonic()
        self.tally.ok_after_last_fault = 0
        return True

    async def restart_gateway(self) -> None:
        """SIGKILL the gateway (its runtime and replicas die with it), then start it again on the same port."""
        _kill(psutil.Process(self.gateway.pid))
        await asyncio.to_thread(self.gateway.stop)  # reaps it and whatever of its tree is left
        # Spawned on this (the main) thread, so the new gateway gets the parent-death signal too; the
        # health polling blocks, so it runs beside the clients' event loop.
        self.gateway.spawn()
        await asyncio.to_thread(self.gateway.wait_healthy)

    def _zygotes(self) -> list[psutil.Process]:
        return [p for p in self.gateway.descendants() if is_zygote(p, self.gateway.pid)]


def _kill(process: psutil.Process) -> None:
    try:
        process.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        pass


def reference_probes(model_dir: Path, plan_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[Probe]:
    """The greedy tokens of every prompt, computed in-process through the same split (the exact reference)."""
    from faasmoe.dispatch.executor import open_executor
    from faasmoe.model.generate import generate
    from faasmoe.model.sampling import SamplingParams
    from faasmoe.model.split_model import SplitModel

    model = SplitModel.load(model_dir, plan_dir, open_executor)
    try:
        outputs = generate(model.trunk, prompts, SamplingParams(new_tokens, 0.0, stop_token_ids=()))
    finally:
        model.close()
    return [Probe(prompt, tokens) for prompt, tokens in zip(prompts, outputs, strict=True)]


@contextlib.contextmanager
def platform_under_test(
    model_dir: Path,
    plan_dir: Path,
    work: Path,
    tenants: Sequence[Tenant],
    *,
    threads: int,
    reconcile_interval_s: float = 1.0,
    gateway_args: Sequence[str] = (),
) -> Iterator[tuple[GatewayProcess, ServeProcess]]:
    """An embedded gateway with generated credentials and a control plane that deploys and keeps its plan there.

    As `faasmoe up` runs them, but as separate processes, so the gateway can be killed and restarted
    under the control plane. The credentials travel in environment variables, never on argv.
    """
    tenants_file = work / "tenants.yaml"
    tenants_file.write_text(yaml.safe_dump({"tenants": [{"name": t.name, "api_keys": [t.api_key]} for t in tenants]}))
    user, password = "chaos", secrets.token_urlsafe(24)
    gateway_env = os.environ | {GATEWAY_USER_VARIABLE: user, GATEWAY_PASSWORD_VARIABLE: password}
    serve_env = os.environ | {"FAASMOE_SERVE_GATEWAY_BASIC_AUTH": f"{user}:{password}"}
    with GatewayProcess(args=list(gateway_args), env=gateway_env, log_path=work / "gateway.log") as gateway:
        args = ["--model", str(model_dir), "--plan", str(plan_dir), "--tenants", str(tenants_file),
                "--gateway", gateway.url, "--threads", str(threads), "--reconcile",
                "--reconcile-interval", str(reconcile_interval_s)]  # fmt: skip
        with ServeProcess(args=args, env=serve_env, log_path=work / "serve.log") as server:
            yield gateway, server
