"""Forwarding one invocation to a replica over pooled keep-alive connections."""

from __future__ import annotations

import logging
from urllib.parse import quote_from_bytes

import httpx
from starlette.requests import Request
from starlette.responses import Response

from faasmoe.gateway.embedded.call_headers import CALL_ID_HEADER
from faasmoe.gateway.embedded.errors import ReplicaUnavailable
from faasmoe.gateway.embedded.pool import FunctionPool
from faasmoe.gateway.embedded.replicas import Replica
from faasmoe.request_body import read_body

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
# What stays as it is in a forwarded path: RFC 3986's path characters and escapes; anything else is escaped.
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
# How long a broken connection waits to learn whether its replica died.
_DEATH_GRACE_S = 0.5


class FunctionProxy:
    def __init__(self, http: httpx.AsyncClient, connect_retries: int, max_body_bytes: int) -> None:
        self.http = http
        self.connect_retries = connect_retries
        self.max_body_bytes = max_body_bytes

    async def forward(self, pool: FunctionPool, request: Request) -> Response:
        """Send ``request`` to a ready replica of ``pool`` and return the function's answer.

        Raises BodyTooLarge (HTTP 413) before buffering an over-size body, FunctionFailed (500) when the
        function cannot load, ReplicaUnavailable (502) when no replica answers. Messages name the function,
        never the replica's address: that, and the cause in full, go to the gateway's log.
        """
        body = await read_body(request, self.max_body_bytes)
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
        target = upstream_target(request)

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
                        raise _unavailable(pool, replica, "is unreachable", exc) from exc
                    continue
                except httpx.TimeoutException as exc:
                    raise _unavailable(pool, replica, "timed out", exc) from exc
                except httpx.TransportError as exc:
                    # The connection broke: if the process died (killed, crashed), the request died with
                    # it unanswered; a dying process closes its sockets just before it can be reaped.
                    if attempt < self.connect_retries and await replica.exits_within(_DEATH_GRACE_S):
                        pool.report_unreachable(replica)
                        continue
                    raise _unavailable(pool, replica, "broke the connection", exc) from exc
                except httpx.HTTPError as exc:
                    raise _unavailable(pool, replica, "failed", exc) from exc
            response = Response(content=upstream.content, status_code=upstream.status_code)
            for key, value in upstream.headers.multi_items():
                if key.lower() not in _NOT_RETURNED:
                    response.headers.append(key, value)
            return response
        raise AssertionError("unreachable: the loop returns or raises on its last attempt")


def upstream_target(request: Request) -> str:
    """``/function/NAME/REST?QUERY`` -> ``/REST?QUERY``, percent-encoded as the caller sent it.

    Forwarding the raw bytes (rather than the decoded path) is what a proxy does: the function decodes
    its own path, and an escape such as %1F or %2F reaches it unchanged.
    """
    raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
    rest = raw_path.split(b"/", 3)[3:]  # b"", b"function", NAME, REST
    target = "/" + quote_from_bytes(rest[0] if rest else b"", safe=_PATH_SAFE)
    query: bytes = request.scope.get("query_string", b"")
    if query:
        target += "?" + quote_from_bytes(query, safe=_PATH_SAFE + "?")
    return target


def _unavailable(pool: FunctionPool, replica: Replica, what: str, cause: Exception) -> ReplicaUnavailable:
    logger.warning("function %s: replica pid %s at %s %s: %r", pool.name, replica.pid, replica.url, what, cause)
    return ReplicaUnavailable(f"function {pool.name!r} {what}")
