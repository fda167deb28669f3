"""Waking every function at once through the gateway's scale API, timed: the yardstick for cold TTFT.

A request after an idle gap finds its functions at zero replicas. With prewarming their cold starts overlap,
and the request should pay about what waking them all together costs: every function asked for one replica
at once (`POST /system/scale-function/{name}`), until each has been ready. Measured on the system's own
gateway before its trace, with nothing else running (the control plane has no request and has invoked no
function yet, so neither its prewarmer nor its idler acts); every function is back at zero, its replica
processes gone, before the trace starts. When they are all ready their PSS is read too: what a replica holds
before any invocation has touched its weights, the cost model's base memory (faasmoe/bench/cost_model.py).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psutil

from faasmoe.bench.sampler import ProcessRoot, processes
from faasmoe.errors import FaasmoeError
from faasmoe.gateway.client import GatewayClient, GatewaySettings
from faasmoe.memory import resident_memory

POLL_S = 0.02


class WakeFailed(FaasmoeError):
    """A wake did not complete: the figure is missing, the system itself may still be measured."""


@dataclass(frozen=True)
class WakeFigures:
    functions: int  # every function of the plan: a cold request's prompt touches nearly all of them
    runs_s: list[float]  # each wake: from the scale calls until every function had been ready
    median_s: float | None  # of the runs (None: none completed)
    error: str | None = None  # why a wake did not complete (the runs before it stand)
    replica_pss_mib: float | None = None  # a replica's PSS with every function ready, median of the runs

    @classmethod
    def of(
        cls, functions: int, runs_s: list[float], error: str | None = None, pss_mib: Sequence[float] = ()
    ) -> WakeFigures:
        median = statistics.median(runs_s) if runs_s else None
        return cls(functions, runs_s, median, error, statistics.median(pss_mib) if pss_mib else None)


def wake_all(
    gateway_url: str, names: list[str], roots: list[ProcessRoot], repeats: int, timeout_s: float
) -> WakeFigures:
    """``repeats`` timed wakes of every named function, each from zero; leaves them all at zero again.

    Raises FaasmoeError if the functions cannot be brought to zero (the trace would not start cold).
    """

    async def run() -> WakeFigures:
        runs: list[float] = []
        pss: list[float] = []
        async with GatewayClient(GatewaySettings(base_url=gateway_url, trust_env=False)) as client:
            await _to_zero(client, names, roots, timeout_s)
            for _ in range(repeats):
                try:
                    runs.append(await _wake(client, names, timeout_s))
                except WakeFailed as exc:
                    await _to_zero(client, names, roots, timeout_s)
                    return WakeFigures.of(len(names), runs, str(exc), pss)
                pss += _replica_pss_mib(roots)
                await _to_zero(client, names, roots, timeout_s)
        return WakeFigures.of(len(names), runs, pss_mib=pss)

    return asyncio.run(run())


async def _wake(client: GatewayClient, names: list[str], timeout_s: float) -> float:
    started = time.monotonic()
    await asyncio.gather(*(client.scale(name, 1) for name in names))
    waiting = set(names)
    while True:
        statuses = {status.name: status for status in await client.list_functions()}
        for name in sorted(waiting):
            status = statuses.get(name)
            if status is not None and status.available_replicas > 0:
                waiting.discard(name)
            elif status is None or status.replicas == 0:
                # The gateway's idle timeout counts from the scale call: a wake longer than it is undone.
                raise WakeFailed(f"{name} went back to zero replicas before it was ready (raise --idle-timeout)")
        elapsed = time.monotonic() - started
        if not waiting:
            return elapsed
        if elapsed > timeout_s:
            raise WakeFailed(f"not ready within {timeout_s:g} s: {sorted(waiting)}")
        await asyncio.sleep(POLL_S)


async def _to_zero(client: GatewayClient, names: list[str], roots: list[ProcessRoot], timeout_s: float) -> None:
    """Scales every named function to zero and waits until no replica process is left."""
    wanted = set(names)
    for status in await client.list_functions():
        if status.name in wanted and status.replicas > 0:
            await client.scale(status.name, 0)
    deadline = time.monotonic() + timeout_s
    while _replicas_alive(roots):
        if time.monotonic() > deadline:
            raise FaasmoeError(f"function replicas still running {timeout_s:g} s after scaling to zero")
        await asyncio.sleep(POLL_S)


def _replica_pss_mib(roots: list[ProcessRoot]) -> list[float]:
    """The mean PSS of the function replicas now, in MiB (none if no replica could be read)."""
    sizes = []
    for pid, role in processes(roots):
        try:
            if role == "function":
                sizes.append(resident_memory(pid).pss / 2**20)
        except (psutil.Error, OSError):  # exited between the walk and the read
            continue
    return [sum(sizes) / len(sizes)] if sizes else []


def _replicas_alive(roots: list[ProcessRoot]) -> bool:
    for pid, role in processes(roots):
        try:
            if role == "function" and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            continue
    return False
