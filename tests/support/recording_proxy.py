"""A reverse proxy that records, in order, every request it forwards: what reached a gateway, and when.

Put between the control plane and the real gateway (``--gateway proxy.url``): each request is logged as
it arrives ("sent", then forwarded at once) and again when the gateway's answer is back ("answered",
with its status), all in one list in the order the proxy saw them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType

import httpx
from fastapi import FastAPI, Request, Response

from tests.app_server import AppServer

SENT, ANSWERED = "sent", "answered"
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# Belong to one connection, or are recomputed for the body actually sent.
_NOT_FORWARDED = frozenset({"host", "content-length", "connection", "keep-alive", "transfer-encoding"})
_NOT_RETURNED = _NOT_FORWARDED | {"content-encoding", "date", "server"}


@dataclass(frozen=True)
class Event:
    kind: str  # SENT or ANSWERED
    method: str
    path: str
    status: int | None = None  # ANSWERED only


class RecordingProxy:
    """``with RecordingProxy(gateway.url) as proxy:`` forwards ``proxy.url`` to the gateway; ``proxy.events``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.events: list[Event] = []  # appended on the proxy's loop only; list.append is atomic for readers
        self.server = AppServer(self._app())

    @property
    def url(self) -> str:
        return self.server.url

    def since(self, mark: int) -> list[Event]:
        """The events after the first ``mark`` (a ``len(proxy.events)`` taken earlier)."""
        return list(self.events[mark:])

    def _app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            async with httpx.AsyncClient(base_url=self.upstream, timeout=120, trust_env=False) as http:
                app.state.http = http
                yield

        app = FastAPI(lifespan=lifespan)

        @app.api_route("/{path:path}", methods=_METHODS)
        async def forward(path: str, request: Request) -> Response:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            self.events.append(Event(SENT, request.method, request.url.path))
            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED]
            http: httpx.AsyncClient = request.app.state.http
            upstream = await http.request(request.method, target, content=await request.body(), headers=headers)
            self.events.append(Event(ANSWERED, request.method, request.url.path, upstream.status_code))
            returned = [(k, v) for k, v in upstream.headers.multi_items() if k.lower() not in _NOT_RETURNED]
            response = Response(upstream.content, status_code=upstream.status_code)
            for key, value in returned:
                response.headers.append(key, value)
            return response

        return app

    def __enter__(self) -> RecordingProxy:
        self.server.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.server.__exit__(exc_type, exc, tb)
