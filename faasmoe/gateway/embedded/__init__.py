"""An embedded OpenFaaS-compatible gateway that runs each function as local OS processes.

It serves the OpenFaaS REST API subset faasmoe needs (see docs and openfaas-contract.md), scales
functions from zero on the first invocation and back to zero when idle. ``faasmoe gateway`` runs it.

    app.py         the HTTP app: routes, auth, errors as statuses, metrics, lifetime; GatewayProcess
    config.py      settings, each function's scale policy, what a function process may run
    pool.py        the deployed functions, their replicas' lifecycle, forwarding an invocation (and its retry)
    replica.py     one function process: start, readiness, stop
    forkserver.py  replicas forked from the function runtime's zygote
"""

from __future__ import annotations

from faasmoe.gateway.embedded.app import GatewayProcess, create_app, is_gateway, is_zygote, run_gateway
from faasmoe.gateway.embedded.config import EmbeddedGatewaySettings

__all__ = ["EmbeddedGatewaySettings", "GatewayProcess", "create_app", "is_gateway", "is_zygote", "run_gateway"]
