"""An embedded OpenFaaS-compatible gateway that runs each function as local OS processes.

It serves the OpenFaaS REST API subset faasmoe needs (see docs and openfaas-contract.md), scales
functions from zero on the first invocation and back to zero when idle.
"""

from __future__ import annotations

from pathlib import Path

from faasmoe.gateway.embedded.app import create_app
from faasmoe.gateway.embedded.options import settings_from_options
from faasmoe.gateway.embedded.process import GatewayProcess
from faasmoe.gateway.embedded.server import run_gateway
from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings

__all__ = [
    "EmbeddedGatewaySettings",
    "GatewayProcess",
    "create_app",
    "gateway_command",
    "run_gateway",
    "settings_from_options",
]


def gateway_command(
    host: str = "127.0.0.1",
    port: int = 8080,
    idle_timeout: float | None = None,
    basic_auth: str | None = None,
    *,
    cold_start_timeout: float | None = None,
    function_command: str | None = None,
    function_spawn: str | None = None,
    log_dir: Path | None = None,
) -> None:
    """What ``faasmoe gateway`` runs: serve the embedded gateway until interrupted.

    Raises ValueError for a malformed ``basic_auth`` (not USER:PASSWORD) and InsecureBindError
    for a non-loopback ``host`` without ``basic_auth``.
    """
    run_gateway(
        settings_from_options(
            host,
            port,
            idle_timeout,
            basic_auth,
            cold_start_timeout=cold_start_timeout,
            function_command=function_command,
            function_spawn=function_spawn,
            log_dir=log_dir,
        )
    )
