"""The HTTP side: /health, /ready, /stats and POST / (the invocation), served by uvicorn behind of-watchdog.

Only Starlette and uvicorn are imported here; torch arrives with the background loader. Compute runs
in one worker thread so the event loop keeps answering /ready and /stats during a long request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from faasmoe.errors import BadRequest, BodyTooLarge
from faasmoe.function import timeline as milestones
from faasmoe.function.headers import (
    COMPUTE_HEADER,
    FUNCTION_HEADER,
    IDLE_HEADER,
    INVOCATION_HEADER,
    LOAD_HEADER,
    QUEUE_HEADER,
)
from faasmoe.function.loader import LoadState, WeightsLoader
from faasmoe.function.settings import FunctionSettings
from faasmoe.function.stats import Counters, function_stats
from faasmoe.function.timeline import Timeline
from faasmoe.request_body import read_body

if TYPE_CHECKING:
    from faasmoe.function.invoke import Invoker  # imports torch, which the loader brings in

logger = logging.getLogger(__name__)


class FunctionApp:
    """The Starlette app of one function replica and the state its routes share."""

    def __init__(self, settings: FunctionSettings, loader: WeightsLoader, timeline: Timeline) -> None:
        self.settings = settings
        self.loader = loader
        self.timeline = timeline
        self.counters = Counters()
        self.in_flight = 0
        self.last_invoked = time.monotonic()  # the start counts as use: a fresh replica is not idle yet
        # One computation at a time: torch already spreads one over the intra-op threads.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faasmoe-compute")
        self._loaded: asyncio.Event | None = None
        self.app = Starlette(
            routes=[
                Route("/", self.invoke, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/ready", self.ready, methods=["GET"]),
                Route("/stats", self.stats, methods=["GET"]),
            ],
            lifespan=self.lifespan,
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        self._loaded = loaded = asyncio.Event()
        self.loader.on_done(lambda: _call_soon(loop, loaded.set))
        yield
        self.executor.shutdown(wait=True)  # uvicorn has drained requests by now; this is belt and braces

    async def health(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, _request: Request) -> Response:
        state = self.loader.state
        if state is LoadState.READY:
            idle = 0.0 if self.in_flight else time.monotonic() - self.last_invoked
            return JSONResponse({"status": "ready"}, headers={IDLE_HEADER: f"{idle:.3f}"})
        if state is LoadState.FAILED:
            return JSONResponse({"status": "failed", "error": self.loader.error}, status_code=500)
        return JSONResponse({"status": "loading"}, status_code=503)

    async def stats(self, _request: Request) -> Response:
        return JSONResponse(function_stats(self.settings.function, self.loader, self.timeline, self.counters))

    async def invoke(self, request: Request) -> Response:
        addressed = request.headers.get(FUNCTION_HEADER)
        if addressed is not None and addressed != self.settings.function:
            return _error(f"this replica serves function {self.settings.function}, not {addressed}", 421)
        self.in_flight += 1
        try:
            return await self._invoke(request)
        finally:
            self.in_flight -= 1
            self.last_invoked = time.monotonic()

    async def _invoke(self, request: Request) -> Response:
        try:
            body = await read_body(request, self.settings.max_body_bytes)
        except BodyTooLarge as exc:
            self.counters.bad_requests += 1
            # Closing the connection: the rest of the body is not read (and a keep-alive would have to be).
            return _error(str(exc), 413, {"Connection": "close"})
        if not await self._wait_loaded():
            self.counters.not_ready += 1
            return _error(
                f"function {self.settings.function} is still loading its weights; retry",
                503,
                {"Retry-After": str(self.settings.retry_after_s)},
            )
        invoker = self.loader.invoker
        if invoker is None:
            self.counters.not_ready += 1
            return _error(f"function {self.settings.function} could not load its weights: {self.loader.error}", 500)
        queued = time.perf_counter()  # from here the call only waits for the compute thread, then computes
        try:
            output, queue_s, compute_s = await asyncio.get_running_loop().run_in_executor(
                self.executor, _timed, invoker, body, queued
            )
        except BadRequest as exc:
            self.counters.bad_requests += 1
            return _error(str(exc), 400)
        except Exception as exc:  # the process keeps serving; the caller learns what went wrong
            self.counters.errors += 1
            logger.exception("function %s: invocation failed", self.settings.function)
            return _error(f"{type(exc).__name__}: {exc}", 500)
        self.counters.invocations += 1
        headers = {
            INVOCATION_HEADER: str(self.counters.invocations),
            COMPUTE_HEADER: f"{compute_s:.6f}",
            QUEUE_HEADER: f"{queue_s:.6f}",
            LOAD_HEADER: f"{self.timeline.get(milestones.LOADED) or 0.0:.3f}",
        }
        return Response(output, media_type=invoker.content_type, headers=headers)

    async def _wait_loaded(self) -> bool:
        if self.loader.done:
            return True
        assert self._loaded is not None, "the lifespan sets up the load event before requests arrive"
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout=self.settings.load_wait_s)
        except asyncio.TimeoutError:
            return False
        return True


class _Server(uvicorn.Server):
    """uvicorn's server, telling when it has bound its socket (the "listening" milestone)."""

    def __init__(self, config: uvicorn.Config, on_listening: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_listening = on_listening

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            self.on_listening()


def serve(settings: FunctionSettings, loader: WeightsLoader, timeline: Timeline) -> None:
    """Runs the server until SIGTERM/SIGINT; uvicorn then stops accepting and finishes in-flight requests."""
    function_app = FunctionApp(settings, loader, timeline)
    config = uvicorn.Config(
        function_app.app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # the root logger set up in __main__ formats uvicorn's lines too
        access_log=False,  # one line per invocation would cost more than a small invocation
        lifespan="on",
        timeout_keep_alive=settings.keep_alive_s,
    )
    # socket(fileno=) reads the inherited socket's family, so accepted connections get TCP_NODELAY.
    sockets = None if settings.listen_fd is None else [socket.socket(fileno=settings.listen_fd)]
    _Server(config, on_listening=lambda: timeline.mark(milestones.LISTENING)).run(sockets=sockets)


def _timed(invoker: Invoker, body: bytes, queued: float) -> tuple[bytes, float, float]:
    """The invocation, the seconds since ``queued`` it waited for the compute thread, and its compute seconds,
    timed on that thread: the hop to it is overhead (or queueing behind earlier calls), not compute."""
    started = time.perf_counter()
    output = invoker(body)
    return output, started - queued, time.perf_counter() - started


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed if loading ends after shutdown
        loop.call_soon_threadsafe(callback)
