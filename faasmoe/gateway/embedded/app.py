"""The embedded gateway's FastAPI app: routes, error mapping, and the processes' lifetime."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException

from faasmoe.gateway.embedded.call_headers import CallHeadersMiddleware
from faasmoe.gateway.embedded.errors import ERROR_STATUS, BodyTooLarge, status_of
from faasmoe.gateway.embedded.function_routes import router as function_router
from faasmoe.gateway.embedded.metrics import GatewayMetrics
from faasmoe.gateway.embedded.runtime import GatewayRuntime
from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings, ensure_safe_binding
from faasmoe.gateway.embedded.system_routes import system_router

logger = logging.getLogger(__name__)


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

    for error_type in ERROR_STATUS:
        app.add_exception_handler(error_type, _plain_text_handler)
    app.add_exception_handler(HTTPException, _http_exception_handler)
    return app


def run_gateway(settings: EmbeddedGatewaySettings | None = None) -> None:
    """Serve the gateway until SIGINT/SIGTERM; every function process is stopped before returning.

    Raises InsecureBindError before binding if the settings are unsafe (see ensure_safe_binding).
    """
    settings = settings or EmbeddedGatewaySettings()
    app = create_app(settings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every readiness probe and forwarded request at INFO: too chatty for a gateway.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        # Requests held for a cold start must not delay shutdown for minutes.
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        # uvicorn re-raises Ctrl-C after its graceful shutdown: the functions are stopped by now.
        pass


async def _plain_text_handler(request: Request, exc: Exception) -> PlainTextResponse:
    """Bodies are plain text, as the OpenFaaS gateway writes them."""
    status_code = status_of(exc)
    if status_code >= 500:
        logger.warning("%s %s: %s", request.method, request.url.path, exc)
    # The rest of an over-size body is never read: the connection cannot be reused.
    headers = {"Connection": "close"} if isinstance(exc, BodyTooLarge) else None
    return PlainTextResponse(str(exc), status_code=status_code, headers=headers)


async def _http_exception_handler(request: Request, exc: Exception) -> PlainTextResponse:
    assert isinstance(exc, HTTPException)
    return PlainTextResponse(str(exc.detail), status_code=exc.status_code, headers=exc.headers)
