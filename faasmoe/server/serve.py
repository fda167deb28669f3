"""`faasmoe serve`: load the platform, then serve HTTP until SIGINT/SIGTERM, then stop the engines.

On either signal uvicorn stops accepting connections and lets in-flight requests finish (up to
``shutdown_grace_s``); SIGTERM then ends the process as a normal exit (faasmoe.process.exit_on_sigterm).
"""

from __future__ import annotations

import logging

import torch
import uvicorn

from faasmoe.logs import setup_logging
from faasmoe.server.api import create_app
from faasmoe.server.platform import Platform
from faasmoe.server.settings import ServeSettings

log = logging.getLogger(__name__)


def serve(settings: ServeSettings) -> None:
    """Raises faasmoe.errors.FaasmoeError (bad checkpoint, plan or tenants file) before listening."""
    setup_logging(settings.log_level)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    platform = Platform.load(settings)
    log.info("serving %s (%s mode, %d tenants) on http://%s:%d", settings.model_name, settings.mode.value,
             len(platform.tenants.tenants), settings.host, settings.port)  # fmt: skip
    try:
        uvicorn.run(
            create_app(platform),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            timeout_graceful_shutdown=settings.shutdown_grace_s,  # then streams in flight are cut
        )
    finally:
        platform.stop()
