"""The HTTP surface: OpenAI-compatible /v1 (also under /tenants/{tenant}/v1), health, readiness, metrics.

Every error, ours or FastAPI's, is answered with an OpenAI-style error object. Tenants' keys open /v1;
/metrics is the operator's, opened only by the metrics key (ServeSettings.metrics_key).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Path, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from faasmoe.server import completions
from faasmoe.server.metrics import CONTENT_TYPE
from faasmoe.server.middleware import TENANT_SCOPE_KEY, BodyLimit, ErrorBoundary, RequestMetrics, error_response
from faasmoe.server.platform import Platform
from faasmoe.server.protocol import (
    ApiError,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    ServerSentEvent,
)
from faasmoe.server.tenants import Tenant

log = logging.getLogger(__name__)

NOT_AN_OBJECT = "the request body must be a JSON object (Content-Type: application/json)"
# pydantic's error types that mean the body as a whole is no JSON object (absent, not JSON, not an object)
NOT_AN_OBJECT_ERRORS = frozenset({"missing", "json_invalid", "model_attributes_type"})
METRICS_OFF = ("/metrics is off: start the server with --metrics-key KEY (or FAASMOE_SERVE_METRICS_KEY) "
               "and send Authorization: Bearer KEY")  # fmt: skip


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for error statuses a route answers, all with the OpenAI error object."""
    return {status: {"model": ErrorResponse} for status in statuses}


AUTH_ERRORS = _errors(401, 403)
# 413 (the body limit) and 500 (the error boundary) are the middleware's; routes with a body meet them.
GENERATION_ERRORS = _errors(400, 401, 403, 404, 413, 429, 500, 502, 503)


def _generation_responses(answer: type[Completion | ChatCompletion]) -> dict[int | str, dict[str, Any]]:
    """The whole answer as JSON, or with `stream: true` as server-sent events; errors as the OpenAI object."""
    stream = {"text/event-stream": {"schema": ServerSentEvent.model_json_schema()}}
    return {200: {"model": answer, "content": {"application/json": {}, **stream}}, **GENERATION_ERRORS}


# Bearer keys, declared in the OpenAPI schema; a missing or non-Bearer header reads as no key (a 401 of ours).
TENANT_KEY = HTTPBearer(scheme_name="TenantKey", description="a tenant's API key", auto_error=False)
METRICS_KEY = HTTPBearer(scheme_name="MetricsKey", description="the operator's metrics key", auto_error=False)
Credentials = HTTPAuthorizationCredentials | None


class _App(FastAPI):
    """FastAPI whose schema lists no 422: validation errors are answered 400 (see `_error_handlers`)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()
            for operation in (op for path in schema["paths"].values() for op in path.values()):
                operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return self.openapi_schema


def create_app(platform: Platform) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        platform.open()  # starts the reconciler, if any
        yield
        await platform.close()

    app = _App(title="faasmoe", lifespan=lifespan)

    async def tenant(request: Request, credentials: Credentials = Security(TENANT_KEY)) -> Tenant:
        if credentials is None:
            raise ApiError(401, "missing API key: send Authorization: Bearer KEY", type="authentication_error",
                           code="invalid_api_key")  # fmt: skip
        found = platform.tenants.authenticate(credentials.credentials)
        if found is None:
            raise ApiError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
        request.scope[TENANT_SCOPE_KEY] = found.name
        return found

    async def acting_as(
        tenant_name: str = Path(alias="tenant", description="the tenant the API key belongs to"),
        caller: Tenant = Depends(tenant),
    ) -> None:
        if tenant_name != caller.name:
            raise ApiError(403, f"this API key may act only as tenant {caller.name!r}", type="permission_error",
                           code="wrong_tenant")  # fmt: skip

    async def operator(credentials: Credentials = Security(METRICS_KEY)) -> None:
        configured = platform.settings.metrics_key
        if configured is None:
            raise ApiError(403, METRICS_OFF, type="permission_error", code="metrics_disabled")
        if credentials is None:
            raise ApiError(401, "missing metrics key: send Authorization: Bearer KEY", type="authentication_error",
                           code="invalid_api_key")  # fmt: skip
        key = credentials.credentials
        if platform.tenants.authenticate(key) is not None:  # first: even a metrics key equal to a tenant's
            raise ApiError(403, "a tenant's API key does not open /metrics; it takes the operator's metrics key",
                           type="permission_error", code="metrics_key_required")  # fmt: skip
        if not hmac.compare_digest(key.encode(), configured.get_secret_value().encode()):
            raise ApiError(401, "invalid metrics key", type="authentication_error", code="invalid_api_key")

    router = APIRouter()

    @router.get("/v1/models", responses=AUTH_ERRORS)
    async def models(caller: Tenant = Depends(tenant)) -> ModelList:
        name = platform.settings.model_name
        cards = [ModelCard(id=name, created=platform.created)] if caller.may_use(name) else []
        return ModelList(data=cards)

    # response_class=Response: no default JSON 200 in the schema; _generation_responses documents both forms.
    @router.post("/v1/completions", response_class=Response, responses=_generation_responses(Completion))
    async def create_completion(body: CompletionRequest, request: Request, caller: Tenant = Depends(tenant)):
        return await completions.create(platform, caller, body, request)

    @router.post("/v1/chat/completions", response_class=Response, responses=_generation_responses(ChatCompletion))
    async def create_chat_completion(body: ChatCompletionRequest, request: Request, caller: Tenant = Depends(tenant)):
        return await completions.create(platform, caller, body, request)

    app.include_router(router)
    app.include_router(router, prefix="/tenants/{tenant}", dependencies=[Depends(acting_as)])

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"description": "Not ready: `reason` says what cannot be served yet"}})
    async def ready() -> JSONResponse:
        reason = await platform.not_ready()
        if reason is None:
            return JSONResponse({"status": "ready", "mode": platform.settings.mode.value})
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    # response_class=Response: no JSON default, so the 200 is the text page and the errors are JSON.
    metrics_page = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **AUTH_ERRORS}

    @app.get("/metrics", response_class=Response, responses=metrics_page, dependencies=[Depends(operator)])
    async def metrics() -> Response:
        return Response(await platform.metrics_page(), media_type=CONTENT_TYPE)

    _error_handlers(app, platform)
    # Added innermost first: metrics see the status the error boundary answers, which sees the 413s.
    app.add_middleware(BodyLimit, max_bytes=platform.settings.max_body_bytes, metrics=platform.metrics)
    app.add_middleware(ErrorBoundary, metrics=platform.metrics)
    app.add_middleware(RequestMetrics, metrics=platform.metrics)
    return app


def _error_handlers(app: FastAPI, platform: Platform) -> None:
    def answer(request: Request, error: ApiError) -> JSONResponse:
        return error_response(request.scope, error, platform.metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        names = [part for part in first["loc"] if isinstance(part, str)]  # json_invalid adds its offset
        if first["type"] in NOT_AN_OBJECT_ERRORS and names == ["body"]:
            return answer(request, ApiError(400, NOT_AN_OBJECT, code=first["type"]))
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        message = f"{where}: {first['msg']}" if where else first["msg"]  # no `where`: the body's own validator
        return answer(request, ApiError(400, message, param=where or None, code=first["type"]))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error = ApiError(exc.status_code, str(exc.detail), type="not_found_error" if exc.status_code == 404 else
                         "invalid_request_error", headers=exc.headers)  # fmt: skip
        return answer(request, error)
