"""The direct path: invocations sent straight to a warm replica that the gateway named, skipping its hop.

The embedded gateway names the replica that served an invocation (``DIRECT_URL_HEADER``). While that
replica keeps being used, the next calls for its function go to it directly, as OpenFaaS's
direct_functions go straight to a function's service. Anything but a 200 (the replica is gone or busy, or
serves another function now: 421) sends the call through the gateway as before; the gateway owns what each
failure means, scales from zero and names a replica again. An address unused for ``FRESH_S`` is forgotten,
so a replica stopped on scale to zero (idle for longer than that) is never called at its old address,
which another process may hold by then. The replica tells the gateway its own idle time, so the gateway
still sees every call when it decides to scale to zero.

A function with several ready replicas (a hot function, faasmoe/elastic/hot_replicas.py) is not called
directly: its calls (one per replica) go through the gateway, which leases each to its least loaded ready replica. The
gateway counts each replica's calls in flight, every engine's, and knows the replicas that became ready or
were stopped a moment ago; this path knows one address per function, learnt from the last answer. Picking
replicas here would repeat the gateway's balancing with less to go on, and keep addresses of replicas a
scale-in stops while they are fresh. The price is the gateway's hop (on this machine a step of 6 MoE layers
took 6-18 % longer through the gateway than direct: benchmarks/results/step.json), paid only by functions
whose calls were queueing behind compute, which is what the replicas take away.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import httpx

from faasmoe.gateway.client import GatewayClient
from faasmoe.gateway.schemas import DIRECT_URL_HEADER

FRESH_S = 1.0  # shorter than any idle timeout a function would have


class DirectReplicas:
    """The replica address known for each function, while it is fresh."""

    def __init__(self, fresh_s: float = FRESH_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.fresh_s = fresh_s
        self.clock = clock
        self._known: dict[str, tuple[str, float]] = {}  # function -> (replica URL, last used)

    async def invoke(
        self, client: GatewayClient, name: str, body: bytes, headers: Mapping[str, str]
    ) -> httpx.Response | None:
        """The replica's 200 answer, or None: no fresh address, or the replica did not answer 200."""
        known = self._known.pop(name, None)
        if known is None or self.clock() - known[1] > self.fresh_s:
            return None
        response = await client.invoke_replica(known[0], name, body, headers)
        if response is not None:
            self._known[name] = (known[0], self.clock())
        return response

    def forget(self, name: str) -> None:
        """Drops the address known for ``name`` (its calls go through the gateway for now)."""
        self._known.pop(name, None)

    def learn(self, name: str, response: httpx.Response) -> None:
        """Remembers the replica the gateway says served ``name`` (real OpenFaaS names none)."""
        url = response.headers.get(DIRECT_URL_HEADER)
        if url is not None and url.startswith("http://"):
            self._known[name] = (url, self.clock())
