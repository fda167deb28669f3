"""The remote transport: one HTTP invocation per function through the OpenFaaS gateway, all in flight at once.

Requests run on an asyncio loop in a background thread, so the trunk thread computes the shared
expert while they are in flight and only waits when it needs the routed result.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from faasmoe.dispatch.executor import FunctionFailed
from faasmoe.dispatch.scatter import DispatchExecutor, FunctionCall
from faasmoe.errors import BadRequest
from faasmoe.experts.wire import CONTENT_TYPE, decode_output, encode_batch
from faasmoe.gateway.client import GatewayClient, GatewayError, GatewaySettings
from faasmoe.planning.plan import Plan

# The function server counts invocations per process; 1 means this call met a freshly started replica.
INVOCATION_HEADER = "X-Faasmoe-Invocation"
# Still busy or starting after the client's retries, no answer at all (None), or not deployed (404: a
# restarted gateway, until the control plane's reconciler redeploys the plan): a later try may succeed.
UNAVAILABLE_STATUSES = frozenset({None, 404, 429, 503})


@dataclass(frozen=True)
class Invocation:
    function: str
    seconds: float
    bytes_sent: int
    bytes_received: int
    cold_start: bool


@dataclass
class InvocationLog:
    """Every invocation's figures; observers (metrics, benchmarks) subscribe to new ones."""

    invocations: list[Invocation] = field(default_factory=list)
    observers: list = field(default_factory=list)
    keep: bool = True

    def record(self, invocation: Invocation) -> None:
        if self.keep:
            self.invocations.append(invocation)
        for observer in self.observers:
            observer(invocation)


class LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="faasmoe-dispatch", daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


class RemoteTransport:
    def __init__(self, settings: GatewaySettings, log: InvocationLog | None = None) -> None:
        self.loop = LoopThread()
        self.client = self.loop.submit(_make_client(settings)).result()
        self.log = log or InvocationLog()

    def send(self, calls: list[FunctionCall]) -> Future[list[torch.Tensor]]:
        bodies = [encode_batch(call.batch) for call in calls]
        return self.loop.submit(self._send_all(calls, bodies))

    async def _send_all(self, calls: list[FunctionCall], bodies: list[bytes]) -> list[torch.Tensor]:
        return list(await asyncio.gather(*(self._invoke(c, b) for c, b in zip(calls, bodies, strict=True))))

    async def _invoke(self, call: FunctionCall, body: bytes) -> torch.Tensor:
        name = call.function.name
        started = time.perf_counter()
        try:
            # A 4xx/5xx (after the client's bounded retries) raises GatewayError naming the function.
            response = await self.client.invoke(name, body, headers={"Content-Type": CONTENT_TYPE})
            output = decode_output(response.content)
        except GatewayError as exc:
            raise FunctionFailed(name, str(exc), unavailable=exc.status in UNAVAILABLE_STATUSES) from exc
        except BadRequest as exc:  # the function answered 200 with a body that is not its output
            message = f"function {name!r} answered an unreadable body: {exc}"
            raise FunctionFailed(name, message, unavailable=False) from exc
        self.log.record(
            Invocation(
                function=name,
                seconds=time.perf_counter() - started,
                bytes_sent=len(body),
                bytes_received=len(response.content),
                cold_start=response.headers.get(INVOCATION_HEADER) == "1",
            )
        )
        return output

    def close(self) -> None:
        self.loop.submit(self.client.aclose()).result()
        self.loop.stop()


async def _make_client(settings: GatewaySettings) -> GatewayClient:
    # The client's connection pool belongs to the loop that creates it.
    return GatewayClient(settings)


def remote_executor(plan: Plan, settings: GatewaySettings, log: InvocationLog | None = None) -> DispatchExecutor:
    return DispatchExecutor(plan, RemoteTransport(settings, log))


def remote_executor_factory(gateway_url: str, basic_auth: str | None = None, log: InvocationLog | None = None):
    """An ExecutorFactory for SplitModel.load that reaches the plan's functions through a gateway."""
    settings = GatewaySettings.from_url(gateway_url, basic_auth)

    def make(plan: Plan, plan_dir: Path) -> DispatchExecutor:
        return remote_executor(plan, settings, log)

    return make
