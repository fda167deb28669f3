"""The remote transport: one HTTP invocation per function through the OpenFaaS gateway, all in flight at once.

Calls for a function whose warm replica the gateway named go straight to that replica (dispatch/direct.py),
and fall back to the gateway on anything but a 200. A function with several ready replicas (a hot function,
elastic/hot_replicas.py) gets one call per replica, each for a share of its experts (DispatchExecutor), sent
through the gateway, which spreads them over the replicas.

Requests run on an asyncio loop in a background thread (a GatewayConnection), so the trunk thread
computes the shared expert while they are in flight and only waits when it needs the routed result.
The control plane opens one connection and shares it: every engine's transport and its own gateway
calls (/ready, metrics, the reconciler) use the one client on that loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from faasmoe.dispatch.direct import DirectReplicas
from faasmoe.dispatch.scatter import FunctionCall
from faasmoe.errors import BadRequest
from faasmoe.experts.wire import CONTENT_TYPE, decode_output, encode_batch
from faasmoe.function.headers import COMPUTE_HEADER, INVOCATION_HEADER, QUEUE_HEADER
from faasmoe.gateway.client import GatewayClient, GatewayError, GatewaySettings
from faasmoe.model.moe_block import FunctionFailed

T = TypeVar("T")
# Still busy or starting after the client's retries, no answer at all (None), or not deployed (404: a
# restarted gateway, until the control plane's reconciler redeploys the plan): a later try may succeed.
UNAVAILABLE_STATUSES = frozenset({None, 404, 429, 503})


@dataclass(frozen=True)
class Invocation:
    function: str
    seconds: float  # round trip: handed to the dispatch loop -> its output decoded
    bytes_sent: int
    bytes_received: int
    cold_start: bool
    compute_seconds: float | None = None  # the function's own time (its compute header); None: it sent none
    direct: bool = False  # sent straight to the replica (faasmoe.dispatch.direct), not through the gateway
    queue_seconds: float | None = None  # waited in the replica for its compute thread (its queue header)

    @property
    def overhead_seconds(self) -> float | None:
        """The round trip minus the function's compute: gateway queueing, transport, thread hops, decoding."""
        return None if self.compute_seconds is None else self.seconds - self.compute_seconds


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


class GatewayConnection:
    """One GatewayClient on its own event loop thread, for callers on any thread or event loop.

    An httpx connection pool belongs to the loop that made it, so every call runs on this one.
    """

    def __init__(self, settings: GatewaySettings) -> None:
        self._loop = LoopThread()
        self._client = self._loop.submit(_open_client(settings)).result()

    def submit(self, call: Callable[[GatewayClient], Coroutine[Any, Any, T]]) -> Future[T]:
        """Runs ``call(client)`` on the connection's loop; from any thread."""
        return self._loop.submit(call(self._client))

    async def run(self, call: Callable[[GatewayClient], Coroutine[Any, Any, T]]) -> T:
        """Awaits ``call(client)`` from another event loop (the HTTP server's); cancelling it cancels the call."""
        return await asyncio.wrap_future(self.submit(call))

    def close(self) -> None:
        """Cancels the calls still running (their futures raise CancelledError), then closes the client."""
        self._loop.submit(_close(self._client)).result()
        self._loop.stop()


class RemoteTransport:
    """Invokes each call's function through ``gateway``, or straight to its warm replica where the gateway
    named one (the direct path); closes the connection only if it ``owns_gateway``."""

    def __init__(self, gateway: GatewayConnection, log: InvocationLog | None = None, *, owns_gateway: bool) -> None:
        self.gateway = gateway
        self.log = log or InvocationLog()
        self.owns_gateway = owns_gateway
        self.direct = DirectReplicas()

    def send(self, calls: list[FunctionCall]) -> Future[list[torch.Tensor]]:
        bodies = [encode_batch(call.batch) for call in calls]
        started = time.perf_counter()  # round trips include the hop onto the dispatch loop's thread
        return self.gateway.submit(lambda client: self._send_all(client, calls, bodies, started))

    async def _send_all(
        self, client: GatewayClient, calls: list[FunctionCall], bodies: list[bytes], started: float
    ) -> list[torch.Tensor]:
        # A function called more than once in a layer has several ready replicas (its call split over them:
        # DispatchExecutor): through the gateway, which spreads the calls over them (dispatch/direct.py says why).
        counts = Counter(call.function.name for call in calls)
        for name in (name for name, count in counts.items() if count > 1):
            self.direct.forget(name)  # once down to one replica, the gateway names it afresh
        invocations = (
            self._invoke(client, c, b, started, may_go_direct=counts[c.function.name] == 1)
            for c, b in zip(calls, bodies, strict=True)
        )
        return list(await asyncio.gather(*invocations))

    async def _invoke(
        self, client: GatewayClient, call: FunctionCall, body: bytes, started: float, *, may_go_direct: bool
    ) -> torch.Tensor:
        name = call.function.name
        headers = {"Content-Type": CONTENT_TYPE}
        try:
            response = await self.direct.invoke(client, name, body, headers) if may_go_direct else None
            direct = response is not None
            if response is None:
                # A 4xx/5xx (after the client's bounded retries) raises GatewayError naming the function.
                response = await client.invoke(name, body, headers=headers)
                if may_go_direct:
                    self.direct.learn(name, response)
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
                compute_seconds=_seconds(response.headers.get(COMPUTE_HEADER)),
                direct=direct,
                queue_seconds=_seconds(response.headers.get(QUEUE_HEADER)),
            )
        )
        return output

    def close(self) -> None:
        if self.owns_gateway:
            self.gateway.close()


def _seconds(header: str | None) -> float | None:
    # A function that is not faasmoe's own server may send no compute (or queue) header, or another value.
    try:
        return float(header) if header is not None else None
    except ValueError:
        return None


async def _open_client(settings: GatewaySettings) -> GatewayClient:
    # The client's connection pool belongs to the loop that creates it.
    return GatewayClient(settings)


async def _close(client: GatewayClient) -> None:
    # A task left pending when the loop stops would leave its caller waiting forever.
    running = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    await client.aclose()
