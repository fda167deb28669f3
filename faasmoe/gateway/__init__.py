"""OpenFaaS gateway: the client faasmoe talks through, and (in ``embedded``) a local gateway.

The client side is imported here; ``faasmoe.gateway.embedded`` pulls in FastAPI and uvicorn and
is imported only by whoever serves a gateway.
"""

from faasmoe.gateway.client import FunctionNotFound, GatewayClient, GatewayError, GatewaySettings, RetryPolicy
from faasmoe.gateway.schemas import (
    DeleteFunctionRequest,
    FunctionDeployment,
    FunctionResources,
    FunctionStatus,
    ScaleServiceRequest,
)

__all__ = [
    "DeleteFunctionRequest",
    "FunctionDeployment",
    "FunctionNotFound",
    "FunctionResources",
    "FunctionStatus",
    "GatewayClient",
    "GatewayError",
    "GatewaySettings",
    "RetryPolicy",
    "ScaleServiceRequest",
]
