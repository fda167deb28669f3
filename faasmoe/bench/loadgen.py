"""The load generators: a trace replayed open-loop, or N closed-loop streams, against /v1/completions, streaming.

Open loop (``LoadGenerator``): each request is sent at its trace time whether or not earlier ones have
finished, as independent users would. Closed loop (``ClosedLoop``, the saturation run): each of N
streams sends its next request as soon as its last one finished. Requests use ``stream: true`` so the
arrival of every token is timed: TTFT is the first token's arrival, TPOT the mean gap between the following ones.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from faasmoe.bench.workload import Trace, TraceRequest

_SSE_DATA = "data:"
_SSE_DONE = "[DONE]"


@dataclass(frozen=True)
class Endpoint:
    """Where one tenant's requests go, and the key that authenticates them."""

    base_url: str
    api_key: str
    model: str = "default"


@dataclass
class RequestResult:
    tenant: str
    scheduled_t: float  # trace time
    sent_t: float  # seconds since the run's start
    prompt_tokens: int
    max_tokens: int
    token_times: list[float] = field(default_factory=list)  # arrival of each output token
    end_t: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times)

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.sent_t if self.token_times else None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None for a one-token answer)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def e2e_s(self) -> float:
        return self.end_t - self.sent_t

    def inter_token_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass
class LoadGenerator:
    trace: Trace
    endpoints: dict[str, Endpoint]  # by tenant
    t0: float  # the run's start on time.monotonic(), shared with the samplers
    request_timeout_s: float
    drain_timeout_s: float
    on_done: Callable[[RequestResult], None] | None = None

    def run(self) -> list[RequestResult]:
        return asyncio.run(self._run_all())

    async def _run_all(self) -> list[RequestResult]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        timeout = httpx.Timeout(self.request_timeout_s, connect=10.0)
        async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as http:
            tasks = [asyncio.create_task(self._scheduled(http, request)) for request in self.trace.requests]
            end_of_trace = self.t0 + self.trace.duration_s
            await asyncio.sleep(max(0.0, end_of_trace - time.monotonic()))
            # The last requests may still be decoding: give them the drain timeout, then cut them off.
            done, pending = await asyncio.wait(tasks, timeout=max(self.drain_timeout_s, 0.001))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return [
            self._cut_off(request) if task.cancelled() else task.result()
            for request, task in zip(self.trace.requests, tasks, strict=True)
        ]

    def _cut_off(self, request: TraceRequest) -> RequestResult:
        result = RequestResult(request.tenant, request.t, request.t, len(request.prompt_ids), request.max_tokens)
        result.end_t = time.monotonic() - self.t0
        result.error = "cut off: not finished within the drain timeout"
        return result

    async def _scheduled(self, http: httpx.AsyncClient, request: TraceRequest) -> RequestResult:
        await asyncio.sleep(max(0.0, self.t0 + request.t - time.monotonic()))
        result = RequestResult(
            request.tenant, request.t, time.monotonic() - self.t0, len(request.prompt_ids), request.max_tokens
        )
        await send(http, self.endpoints[request.tenant], request, result, self.t0)
        if self.on_done is not None:
            self.on_done(result)
        return result


@dataclass
class ClosedLoop:
    """``streams`` concurrent streams cycling through ``requests``; each sends its next when one finishes.

    A stream whose request fails stops (its error is in the results), rather than retrying in a busy loop.
    """

    requests: list[TraceRequest]
    endpoints: dict[str, Endpoint]  # by tenant
    streams: int
    request_timeout_s: float

    def warm_up(self) -> list[RequestResult]:
        """One request per stream, all at once, unmeasured: every function the load calls is warm after."""
        return asyncio.run(self._with_client(lambda http: self._round(http, time.monotonic())))

    def run(self, t0: float, duration_s: float) -> list[RequestResult]:
        """Every request sent from ``t0`` (time.monotonic()) for ``duration_s``; times are seconds since ``t0``.

        Requests in flight at the end are cut off there; the tokens they streamed until then count.
        """
        return asyncio.run(self._with_client(lambda http: self._window(http, t0, duration_s)))

    async def _with_client(self, run: Callable[[httpx.AsyncClient], Awaitable[list[RequestResult]]]):
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=max(64, self.streams))
        timeout = httpx.Timeout(self.request_timeout_s, connect=10.0)
        async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as http:
            return await run(http)

    async def _round(self, http: httpx.AsyncClient, t0: float) -> list[RequestResult]:
        requests = [self._request(number, t0) for number in range(self.streams)]
        await asyncio.gather(*(send(http, self.endpoints[r.tenant], r, result, t0) for r, result in requests))
        return [result for _, result in requests]

    async def _window(self, http: httpx.AsyncClient, t0: float, duration_s: float) -> list[RequestResult]:
        results: list[RequestResult] = []
        streams = [asyncio.create_task(self._stream(http, index, t0, results)) for index in range(self.streams)]
        await asyncio.sleep(max(0.0, t0 + duration_s - time.monotonic()))
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        return results

    async def _stream(self, http: httpx.AsyncClient, index: int, t0: float, results: list[RequestResult]) -> None:
        for number in itertools.count(index + self.streams, self.streams):  # the warm-up sent the first
            request, result = self._request(number, t0)
            results.append(result)  # before it is sent: one cut off at the end still counts its tokens
            await send(http, self.endpoints[request.tenant], request, result, t0)
            if result.error is not None:
                return

    def _request(self, number: int, t0: float) -> tuple[TraceRequest, RequestResult]:
        request = self.requests[number % len(self.requests)]
        sent = time.monotonic() - t0
        return request, RequestResult(request.tenant, sent, sent, len(request.prompt_ids), request.max_tokens)


async def send(
    http: httpx.AsyncClient, endpoint: Endpoint, request: TraceRequest, result: RequestResult, t0: float
) -> None:
    """Streams ``request`` into ``result``: token arrivals and the end in seconds since ``t0``, or its error."""
    try:
        await _stream(http, endpoint, request, result, t0)
    except Exception as exc:  # noqa: BLE001 - any failure is this request's error, never the run's
        result.error = f"{type(exc).__name__}: {exc}"
    result.end_t = time.monotonic() - t0
    if result.error is None and not result.token_times:
        result.error = "no tokens in the stream"


async def _stream(
    http: httpx.AsyncClient, endpoint: Endpoint, request: TraceRequest, result: RequestResult, t0: float
) -> None:
    body = completion_body(request, endpoint.model)
    headers = {"Authorization": f"Bearer {endpoint.api_key}"}
    async with http.stream("POST", endpoint.base_url + "/v1/completions", json=body, headers=headers) as response:
        if response.status_code != httpx.codes.OK:
            text = (await response.aread()).decode(errors="replace")[:300]
            result.error = f"HTTP {response.status_code}: {text}"
            return
        async for line in response.aiter_lines():
            if not line.startswith(_SSE_DATA):
                continue
            data = line[len(_SSE_DATA) :].strip()
            if data == _SSE_DONE:
                return
            now = time.monotonic() - t0
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = str(chunk["error"])[:300]
                return
            result.token_times += [now] * tokens_in_chunk(chunk)


def completion_body(request: TraceRequest, model: str) -> dict[str, object]:
    """Greedy, exactly ``max_tokens`` tokens (EOS ignored), prompt given as token ids."""
    return {
        "model": model,
        "prompt": request.prompt_ids,
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "return_token_ids": True,
        "ignore_eos": True,
    }


def tokens_in_chunk(chunk: dict) -> int:
    """Output tokens a streamed chunk carries: its token ids when given, else one per non-empty text."""
    count = 0
    for choice in chunk.get("choices") or []:
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            count += len(ids)
        elif choice.get("text"):
            count += 1
    return count
