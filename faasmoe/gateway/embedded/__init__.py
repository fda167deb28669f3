"""An embedded OpenFaaS-compatible gateway that runs each function as local OS processes.

It serves the OpenFaaS REST API subset faasmoe needs (see docs and openfaas-contract.md), scales
functions from zero on the first invocation and back to zero when idle. ``faasmoe gateway`` runs it.
"""

from __future__ import annotations

from faasmoe.gateway.embedded.app import create_app, run_gateway
from faasmoe.gateway.embedded.process import GatewayProcess
from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings

__all__ = ["EmbeddedGatewaySettings", "GatewayProcess", "create_app", "run_gateway"]
