"""Forwarding one invocation to a replica over pooled keep-alive connections."""

from __future__ import annotations

import logging

import httpx
from starlette.requests import Request
from starlette.responses import Response

from faasmoe.gateway.embedded.call_headers import CALL_ID_HEADER
from faasmoe.gateway.embedded.errors import ReplicaUnavailable
from faasmoe.gateway.embedded.pool import FunctionPool

logger = logging.getLogger(__name__)

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are not forwarded; length
# and encoding are recomputed for the body actually sent (httpx decodes compressed bodies).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_NOT_RETURNED = _HOP_BY_HOP | {"content-encoding", "date", "server"}
# How long a broken connection waits to learn whether its replica died.
_DEATH_GRACE_S = 0.5


class FunctionProxy:
    def __init__(self, http: httpx.AsyncClient, connect_retries: int) -> None:
        self.http = http
        self.connect_retries = connect_retries

    async def forward(self, pool: FunctionPool, request: Request, path: str) -> Response:
        """Send ``request`` to a ready replica of ``pool`` and return the function's answer.

        Raises ReplicaUnavailable (HTTP 502) when no replica answers.
        """
        body = await request.body()
        headers = [
            (k, v)
            for k, v in request.headers.items()
            if k.lower() not in _HOP_BY_HOP and k.lower() not in ("x-call-id", "x-forwarded-for")
        ]
        headers.append((CALL_ID_HEADER, request.state.call_id))
        if request.client is not None:
            forwarded = request.headers.get("x-forwarded-for")
            client = request.client.host
            headers.append(("X-Forwarded-For", f"{forwarded}, {client}" if forwarded else client))
        target = "/" + path.lstrip("/")
        if request.url.query:
            target += "?" + request.url.query

        for attempt in range(self.connect_retries + 1):
            async with pool.lease() as replica:
                try:
                    upstream = await self.http.request(
                        request.method, replica.url + target, content=body, headers=headers
                    )
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    # Never reached the function (the replica died or is shutting down): replace
                    # the replica and try once more.
                    pool.report_unreachable(replica)
                    if attempt == self.connect_retries:
                        raise ReplicaUnavailable(
                            f"function {pool.name!r} unreachable at {replica.url}: {exc!r}"
                        ) from exc
                    continue
                except httpx.TimeoutException as exc:
                    raise ReplicaUnavailable(f"function {pool.name!r} timed out: {exc!r}") from exc
                except httpx.TransportError as exc:
                    # The connection broke: if the process died (killed, crashed), the request died with
                    # it unanswered; a dying process closes its sockets just before it can be reaped.
                    if attempt < self.connect_retries and await replica.exits_within(_DEATH_GRACE_S):
                        pool.report_unreachable(replica)
                        continue
                    raise ReplicaUnavailable(f"function {pool.name!r} failed: {exc!r}") from exc
                except httpx.HTTPError as exc:
                    raise ReplicaUnavailable(f"function {pool.name!r} failed: {exc!r}") from exc
            response = Response(content=upstream.content, status_code=upstream.status_code)
            for key, value in upstream.headers.multi_items():
                if key.lower() not in _NOT_RETURNED:
                    response.headers.append(key, value)
            return response
        raise AssertionError("unreachable: the loop returns or raises on its last attempt")
