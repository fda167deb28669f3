"""The HTTP surface: OpenAI-compatible /v1 (also under /tenants/{tenant}/v1), health, readiness, metrics.

Every error, ours or FastAPI's, is answered with an OpenAI-style error object.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from faasmoe.server import completions
from faasmoe.server.metrics import CONTENT_TYPE
from faasmoe.server.platform import Platform
from faasmoe.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from faasmoe.server.tenants import Tenant

log = logging.getLogger(__name__)

TENANT_SCOPE_KEY = "faasmoe.tenant"  # set once authenticated, read by the request metrics
UNKNOWN_TENANT = ""
NOT_AN_OBJECT = "the request body must be a JSON object (Content-Type: application/json)"


def create_app(platform: Platform) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        platform.open_gateway()  # on this event loop: its connection pool belongs to it
        yield
        await platform.close()

    app = FastAPI(title="faasmoe", lifespan=lifespan)

    async def tenant(request: Request) -> Tenant:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "missing API key: send Authorization: Bearer KEY", type="authentication_error",
                           code="invalid_api_key")  # fmt: skip
        found = platform.tenants.authenticate(key.strip())
        if found is None:
            raise ApiError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
        request.scope[TENANT_SCOPE_KEY] = found.name
        path_tenant = request.path_params.get("tenant")
        if path_tenant is not None and path_tenant != found.name:
            raise ApiError(403, f"this API key may act only as tenant {found.name!r}", type="permission_error",
                           code="wrong_tenant")  # fmt: skip
        return found

    router = APIRouter()

    @router.get("/v1/models")
    async def models(caller: Tenant = Depends(tenant)) -> ModelList:
        name = platform.settings.model_name
        cards = [ModelCard(id=name, created=platform.created)] if caller.may_use(name) else []
        return ModelList(data=cards)

    @router.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request, caller: Tenant = Depends(tenant)):
        return await completions.create(platform, caller, body, request)

    @router.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request, caller: Tenant = Depends(tenant)):
        return await completions.create(platform, caller, body, request)

    app.include_router(router)
    app.include_router(router, prefix="/tenants/{tenant}")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if await platform.gateway_reachable():
            return JSONResponse({"status": "ready", "mode": platform.settings.mode.value})
        return JSONResponse({"status": "gateway unreachable", "gateway": platform.settings.gateway}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await platform.metrics_page(), media_type=CONTENT_TYPE)

    _error_handlers(app, platform)
    app.add_middleware(RequestMetrics, platform=platform)
    return app


def _error_handlers(app: FastAPI, platform: Platform) -> None:
    def answer(request: Request, error: ApiError) -> JSONResponse:
        tenant = request.scope.get(TENANT_SCOPE_KEY, UNKNOWN_TENANT)
        platform.metrics.errors.labels(tenant, error.body.error.type).inc()
        return JSONResponse(error.body.model_dump(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        message = f"{where}: {first['msg']}" if where else NOT_AN_OBJECT
        return answer(request, ApiError(400, message, param=where or None, code=first["type"]))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error = ApiError(exc.status_code, str(exc.detail), type="not_found_error" if exc.status_code == 404 else
                         "invalid_request_error", headers=exc.headers)  # fmt: skip
        return answer(request, error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return answer(request, ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))


class RequestMetrics:
    """Counts every request by tenant, route and status (a plain ASGI middleware: streaming untouched)."""

    def __init__(self, app: ASGIApp, platform: Platform) -> None:
        self.app = app
        self.platform = platform

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            tenant = scope.get(TENANT_SCOPE_KEY, UNKNOWN_TENANT)
            self.platform.metrics.requests.labels(tenant, endpoint, str(status)).inc()
