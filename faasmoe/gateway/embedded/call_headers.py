"""X-Call-Id, X-Start-Time and X-Duration-Seconds on every response, as the OpenFaaS gateway sends."""

from __future__ import annotations

import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CALL_ID_HEADER = "X-Call-Id"


class CallHeadersMiddleware:
    """Pure ASGI middleware (no body buffering): tags each call and times it.

    A caller's own X-Call-Id is kept, so one id can follow a request across services; the id is
    left in ``request.state.call_id`` for the proxy to pass on to the function.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        call_id = Headers(scope=scope).get(CALL_ID_HEADER) or str(uuid.uuid4())
        scope.setdefault("state", {})["call_id"] = call_id
        start_ns = time.time_ns()
        started = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[CALL_ID_HEADER] = call_id
                headers["X-Start-Time"] = str(start_ns)
                headers["X-Duration-Seconds"] = f"{time.perf_counter() - started:.6f}"
            await send(message)

        await self.app(scope, receive, send_with_headers)
