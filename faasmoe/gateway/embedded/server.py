"""Serving the embedded gateway with uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from faasmoe.gateway.embedded.app import create_app
from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings


def run_gateway(settings: EmbeddedGatewaySettings | None = None) -> None:
    """Serve the gateway until SIGINT/SIGTERM; every function process is stopped before returning.

    Raises InsecureBindError before binding if /system/* would be open beyond loopback.
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
