"""/system/*: the OpenFaaS management API (behind basic auth when credentials are set)."""

from __future__ import annotations

from importlib import metadata
from typing import TypeVar

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from faasmoe.errors import BadRequest
from faasmoe.gateway.embedded.auth import basic_auth_guard, same_origin_guard
from faasmoe.gateway.embedded.runtime import runtime_of
from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings
from faasmoe.gateway.schemas import (
    DeleteFunctionRequest,
    FunctionDeployment,
    ProviderInfo,
    ScaleServiceRequest,
    VersionInfo,
)
from faasmoe.request_body import MIB, read_body

PROVIDER_NAME = "faasmoe-embedded"
ORCHESTRATION = "local-processes"
# A deployment document is a few kB; this bounds what an API call can make the gateway buffer.
SYSTEM_BODY_LIMIT = MIB

Model = TypeVar("Model", bound=BaseModel)


async def read_model(request: Request, model: type[Model]) -> Model:
    """The request body as ``model``; malformed JSON or fields are a BadRequest (HTTP 400)."""
    raw = await read_body(request, SYSTEM_BODY_LIMIT)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}" for error in exc.errors()
        )
        raise BadRequest(f"invalid {model.__name__} JSON: {problems}") from None


def _faasmoe_release() -> str:
    try:
        return metadata.version("faasmoe")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "dev"


def system_router(settings: EmbeddedGatewaySettings) -> APIRouter:
    # Credentials first (401), then where the request comes from and what it carries (403, 415).
    guards = [Depends(basic_auth_guard(settings)), Depends(same_origin_guard(settings))]
    router = APIRouter(prefix="/system", dependencies=guards)

    @router.get("/functions")
    async def list_functions(request: Request) -> JSONResponse:
        return JSONResponse([s.to_wire() for s in runtime_of(request).registry.statuses()])

    @router.post("/functions")
    async def deploy_function(request: Request) -> Response:
        runtime_of(request).registry.deploy(await read_model(request, FunctionDeployment))
        return Response(status_code=status.HTTP_202_ACCEPTED)

    @router.put("/functions")
    async def update_function(request: Request) -> Response:
        await runtime_of(request).registry.update(await read_model(request, FunctionDeployment))
        return Response(status_code=status.HTTP_202_ACCEPTED)

    @router.delete("/functions")
    async def delete_function(request: Request) -> Response:
        body = await read_model(request, DeleteFunctionRequest)
        await runtime_of(request).registry.delete(body.function_name)
        return Response(status_code=status.HTTP_200_OK)

    @router.get("/function/{name}")
    async def get_function(name: str, request: Request) -> JSONResponse:
        return JSONResponse(runtime_of(request).registry.status(name).to_wire())

    @router.post("/scale-function/{name}")
    async def scale_function(name: str, request: Request) -> Response:
        # The path names the function (as in current OpenFaaS); the body gives the count.
        body = await read_model(request, ScaleServiceRequest)
        runtime_of(request).registry.scale(name, body.replicas)
        return Response(status_code=status.HTTP_202_ACCEPTED)

    @router.get("/info")
    async def info() -> JSONResponse:
        # faas-provider's flat ProviderInfo: what the OpenFaaS gateway reads from its provider (and wraps,
        # with its own version and arch, in the GatewayInfo it answers), so that this can be its provider.
        version = VersionInfo(release=_faasmoe_release())
        return JSONResponse(
            ProviderInfo(provider=PROVIDER_NAME, orchestration=ORCHESTRATION, version=version).to_wire()
        )

    return router
