"""The embedded gateway's FastAPI app: routes, error mapping, and the processes' lifetime."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException

from faasmoe.errors import BadRequest
from faasmoe.gateway.embedded.call_headers import CallHeadersMiddleware
from faasmoe.gateway.embedded.errors import ReplicaUnavailable, UnknownFunction
from faasmoe.gateway.embedded.function_routes import router as function_router
from faasmoe.gateway.embedded.metrics import GatewayMetrics
from faasmoe.gateway.embedded.runtime import GatewayRuntime
from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings, ensure_safe_binding
from faasmoe.gateway.embedded.system_routes import system_router

logger = logging.getLogger(__name__)

# Error -> status; bodies are plain text, as the OpenFaaS gateway writes them.
_ERROR_STATUS: dict[type[Exception], int] = {
    UnknownFunction: 404,
    BadRequest: 400,
    ReplicaUnavailable: 502,
}


def create_app(settings: EmbeddedGatewaySettings | None = None) -> FastAPI:
    """The gateway app; function processes live from its startup to its shutdown.

    Raises InsecureBindError if ``settings`` would expose an open /system/* API beyond loopback.
    """
    settings = settings or EmbeddedGatewaySettings()
    ensure_safe_binding(settings)
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = GatewayRuntime.start(settings, metrics)
        app.state.runtime = runtime
        try:
            yield
        finally:
            # Also reached on SIGTERM/SIGINT: uvicorn shuts the app down before exiting.
            logger.info("stopping every function process")
            await runtime.close()

    app = FastAPI(
        title="faasmoe embedded OpenFaaS gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(CallHeadersMiddleware)
    app.include_router(function_router)
    app.include_router(system_router(settings))

    for error_type, status_code in _ERROR_STATUS.items():
        app.add_exception_handler(error_type, _plain_text_handler(status_code))
    app.add_exception_handler(HTTPException, _http_exception_handler)
    return app


def _plain_text_handler(status_code: int) -> Callable[[Request, Exception], Awaitable[PlainTextResponse]]:
    async def handle(request: Request, exc: Exception) -> PlainTextResponse:
        if status_code >= 500:
            logger.warning("%s %s: %s", request.method, request.url.path, exc)
        return PlainTextResponse(str(exc), status_code=status_code)

    return handle


async def _http_exception_handler(request: Request, exc: Exception) -> PlainTextResponse:
    assert isinstance(exc, HTTPException)
    return PlainTextResponse(str(exc.detail), status_code=exc.status_code, headers=exc.headers)
