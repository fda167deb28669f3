"""The control plane's ASGI middleware, outermost first: request metrics, the error boundary, the body limit.

Plain ASGI (no BaseHTTPMiddleware), so streamed responses pass through untouched.
"""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from faasmoe.server.metrics import Metrics
from faasmoe.server.protocol import ApiError
from faasmoe.server.sequence import new_request_id

log = logging.getLogger(__name__)

TENANT_SCOPE_KEY = "faasmoe.tenant"  # set once authenticated, read by the request metrics
REQUEST_ID_SCOPE_KEY = "faasmoe.request_id"  # set by the error boundary, named in logs and 5xx bodies
REQUEST_ID_HEADER = "X-Request-Id"
UNKNOWN_TENANT = ""


def error_response(scope: Scope, error: ApiError, metrics: Metrics) -> JSONResponse:
    """The OpenAI-style error object for `error`, counted by tenant and type."""
    metrics.errors.labels(scope.get(TENANT_SCOPE_KEY, UNKNOWN_TENANT), error.body.error.type).inc()
    return JSONResponse(error.body.model_dump(), status_code=error.status, headers=error.headers)


def request_id(scope: Scope) -> str:
    return scope[REQUEST_ID_SCOPE_KEY]


class RequestMetrics:
    """Counts every request by tenant, route and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            tenant = scope.get(TENANT_SCOPE_KEY, UNKNOWN_TENANT)
            self.metrics.requests.labels(tenant, endpoint, str(status)).inc()


class ErrorBoundary:
    """Gives each request an id (the X-Request-Id header) and answers what nothing else caught with a 500.

    Inside Starlette's ServerErrorMiddleware, which would re-raise and so make the server drop the
    keep-alive connection: the 500 answered here is a complete response, and the connection stays.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = scope[REQUEST_ID_SCOPE_KEY] = new_request_id()
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.lower().encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s: unexpected error on %s", rid, scope.get("path"))
            if started:  # nothing to answer with: the server ends the incomplete response
                return
            error = ApiError(500, f"internal error; the server log has the details under request id {rid}",
                             type="server_error", code="internal_error")  # fmt: skip
            await error_response(scope, error, self.metrics)(scope, receive, send_with_id)


class BodyLimit:
    """Answers 413 to a request body over `max_bytes`, reading no more of it than that.

    A declared Content-Length over the limit is refused before any of the body is read; a body without
    one (chunked) is read up to the limit. The body read is handed on to the app unchanged.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away: the app sees that
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(413, f"the request body is over the limit of {self.max_bytes} bytes",
                         code="request_too_large")  # fmt: skip
        response = error_response(scope, error, self.metrics)
        response.headers["Connection"] = "close"  # the rest of the body is not read: this connection is done
        await response(scope, receive, send)
