"""The embedded gateway's HTTP app: routes, who may call /system/*, errors as statuses, metrics, lifetime.

Invocation (/function/*), /healthz and /metrics are open; /system/* (the OpenFaaS management API) is
behind basic auth when credentials are set, and never reachable from a browser cross-site.
``run_gateway`` serves the app; ``GatewayProcess`` runs it as a child process (`faasmoe gateway`).
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import metadata
from typing import TypeVar
from urllib.parse import urlsplit

import psutil
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBasic
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from faasmoe.errors import BadRequest, BodyTooLarge, FaasmoeError
from faasmoe.gateway.embedded.config import EmbeddedGatewaySettings, ensure_safe_binding, is_loopback
from faasmoe.gateway.embedded.forkserver import ZYGOTE_MODULE
from faasmoe.gateway.embedded.pool import CALL_ID_HEADER, FunctionRegistry, UnknownFunction
from faasmoe.gateway.embedded.replica import FunctionFailed, ReplicaUnavailable
from faasmoe.gateway.schemas import (
    DeleteFunctionRequest,
    FunctionDeployment,
    ProviderInfo,
    ScaleServiceRequest,
    VersionInfo,
)
from faasmoe.logs import setup_logging
from faasmoe.process import ServiceProcess
from faasmoe.request_body import MIB, read_body

logger = logging.getLogger(__name__)

PROVIDER_NAME = "faasmoe-embedded"
ORCHESTRATION = "local-processes"
# A deployment document is a few kB; this bounds what an API call can make the gateway buffer.
SYSTEM_BODY_LIMIT = MIB
CLI_MODULE = "faasmoe.cli"
GATEWAY_SUBCOMMAND = "gateway"
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
_JSON = "application/json"
_READS = ("GET", "HEAD")
_REALM = "faasmoe gateway"

Model = TypeVar("Model", bound=BaseModel)


class UnsupportedMediaType(FaasmoeError):
    """A /system/* body that is not declared as JSON (HTTP 415): no cross-site form can send one."""


class ForbiddenHost(FaasmoeError):
    """A /system/* request to an open (loopback) gateway under a non-loopback Host: DNS rebinding (HTTP 403)."""


# Error -> HTTP status; the most specific class that matches wins (ReplicaLost is a ReplicaUnavailable).
# "Busy / starting" is the function's own 429/503, passed through; these are the gateway's own answers.
ERROR_STATUS: dict[type[Exception], int] = {
    UnknownFunction: 404,
    BadRequest: 400,
    ForbiddenHost: 403,
    BodyTooLarge: 413,
    UnsupportedMediaType: 415,
    FunctionFailed: 500,
    ReplicaUnavailable: 502,
}


def status_of(error: Exception) -> int:
    """The HTTP status ``error`` answers with; 500 for anything unexpected."""
    for error_type in type(error).__mro__:
        if error_type in ERROR_STATUS:
            return ERROR_STATUS[error_type]
    return 500


def create_app(settings: EmbeddedGatewaySettings | None = None) -> FastAPI:
    """The gateway app; function processes live from its startup to its shutdown.

    Raises InsecureBindError if ``settings`` would expose an open /system/* API beyond loopback.
    """
    settings = settings or EmbeddedGatewaySettings()
    ensure_safe_binding(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = FunctionRegistry.start(settings)
        app.state.registry = registry
        try:
            yield
        finally:
            # Also reached on SIGTERM/SIGINT: uvicorn shuts the app down before exiting.
            logger.info("stopping every function process")
            await registry.close()

    app = FastAPI(
        title="faasmoe embedded OpenFaaS gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.metrics = GatewayMetrics()
    app.add_middleware(CallHeadersMiddleware)
    app.include_router(function_router)
    app.include_router(system_router(settings))

    for error_type in ERROR_STATUS:
        app.add_exception_handler(error_type, _plain_text_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    return app


def run_gateway(settings: EmbeddedGatewaySettings | None = None) -> None:
    """Serve the gateway until SIGINT/SIGTERM; every function process is stopped before returning.

    Raises InsecureBindError before binding if the settings are unsafe (see ensure_safe_binding).
    """
    settings = settings or EmbeddedGatewaySettings()
    app = create_app(settings)
    setup_logging(settings.log_level)
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
    assert isinstance(exc, StarletteHTTPException)
    return PlainTextResponse(str(exc.detail), status_code=exc.status_code, headers=exc.headers)


# --- invocation (/function/*), /healthz and /metrics: the open routes -------------------------

function_router = APIRouter()


def registry_of(request: Request) -> FunctionRegistry:
    registry: FunctionRegistry = request.app.state.registry
    return registry


@function_router.api_route("/function/{name}", methods=_METHODS)
async def invoke(name: str, request: Request) -> Response:
    return await _invoke(name, request)


@function_router.api_route("/function/{name}/{path:path}", methods=_METHODS)
async def invoke_path(name: str, path: str, request: Request) -> Response:
    return await _invoke(name, request)  # the pool forwards the path as the caller sent it, still encoded


async def _invoke(name: str, request: Request) -> Response:
    metrics: GatewayMetrics = request.app.state.metrics
    # "name.namespace" addresses a namespace in OpenFaaS; this gateway has only one.
    name = name.split(".", 1)[0]
    pool = registry_of(request).pool(name)  # unknown names answer 404 and are not counted
    pool.invocation_count += 1
    started = time.perf_counter()
    try:
        response = await pool.forward(request)
    except Exception as exc:
        metrics.observe_invocation(name, status_of(exc), time.perf_counter() - started)
        raise
    metrics.observe_invocation(name, response.status_code, time.perf_counter() - started)
    return response


@function_router.get("/healthz")
async def healthz() -> PlainTextResponse:
    return PlainTextResponse("OK")


@function_router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry = registry_of(request)
    gateway_metrics: GatewayMetrics = request.app.state.metrics
    replicas = {name: registry.pool(name).desired for name in registry.names()}
    return Response(gateway_metrics.render(replicas), media_type=gateway_metrics.content_type)


class GatewayMetrics:
    """The gateway's Prometheus metrics, named as the OpenFaaS gateway names them.

    One registry per gateway app, so several apps in one process (tests) do not collide.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.invocations = Counter(
            "gateway_function_invocation",  # exposed as gateway_function_invocation_total
            "Function invocations by status code",
            ["function_name", "code"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "gateway_functions_seconds",
            "Function invocation time taken",
            ["function_name", "code"],
            registry=self.registry,
        )
        self.service_count = Gauge(
            "gateway_service_count",
            "Desired replicas of each function",
            ["function_name"],
            registry=self.registry,
        )

    def observe_invocation(self, function: str, code: int, seconds: float) -> None:
        self.invocations.labels(function_name=function, code=str(code)).inc()
        self.seconds.labels(function_name=function, code=str(code)).observe(seconds)

    def render(self, replicas: dict[str, int]) -> bytes:
        """The exposition text, with the service counts refreshed from ``replicas``."""
        self.service_count.clear()  # deleted functions disappear
        for function, count in replicas.items():
            self.service_count.labels(function_name=function).set(count)
        return generate_latest(self.registry)


class CallHeadersMiddleware:
    """X-Call-Id, X-Start-Time and X-Duration-Seconds on every response, as the OpenFaaS gateway sends.

    Pure ASGI middleware (no body buffering): tags each call and times it. A caller's own X-Call-Id is
    kept, so one id can follow a request across services; the id is left in ``request.state.call_id``
    for the pool to pass on to the function.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        call_id = Headers(scope=scope).get(CALL_ID_HEADER) or str(uuid.uuid4())
        scope.setdefault("state", {})["call_id"] = call_id
        start_ns = time.time_ns()
        started = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[CALL_ID_HEADER] = call_id
                headers["X-Start-Time"] = str(start_ns)
                headers["X-Duration-Seconds"] = f"{time.perf_counter() - started:.6f}"
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --- /system/*: the OpenFaaS management API -----------------------------------------------------


def system_router(settings: EmbeddedGatewaySettings) -> APIRouter:
    # Credentials first (401), then where the request comes from and what it carries (403, 415).
    guards = [Depends(basic_auth_guard(settings)), Depends(same_origin_guard(settings))]
    router = APIRouter(prefix="/system", dependencies=guards)

    @router.get("/functions")
    async def list_functions(request: Request) -> JSONResponse:
        return JSONResponse([s.to_wire() for s in registry_of(request).statuses()])

    @router.post("/functions")
    async def deploy_function(request: Request) -> Response:
        registry_of(request).deploy(await read_model(request, FunctionDeployment))
        return Response(status_code=status.HTTP_202_ACCEPTED)

    @router.put("/functions")
    async def update_function(request: Request) -> Response:
        await registry_of(request).update(await read_model(request, FunctionDeployment))
        return Response(status_code=status.HTTP_202_ACCEPTED)

    @router.delete("/functions")
    async def delete_function(request: Request) -> Response:
        body = await read_model(request, DeleteFunctionRequest)
        await registry_of(request).delete(body.function_name)
        return Response(status_code=status.HTTP_200_OK)

    @router.get("/function/{name}")
    async def get_function(name: str, request: Request) -> JSONResponse:
        return JSONResponse(registry_of(request).status(name).to_wire())

    @router.post("/scale-function/{name}")
    async def scale_function(name: str, request: Request) -> Response:
        # The path names the function (as in current OpenFaaS); the body gives the count.
        body = await read_model(request, ScaleServiceRequest)
        registry_of(request).scale(name, body.replicas)
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


def basic_auth_guard(settings: EmbeddedGatewaySettings) -> Callable[[Request], object]:
    """A FastAPI dependency that answers 401 unless the request carries the configured credentials.

    Without configured credentials it lets everything through (the gateway then binds to
    loopback only, see ensure_safe_binding).
    """
    if not settings.auth_enabled:

        async def open_access(request: Request) -> None:
            return None

        return open_access

    assert settings.basic_auth_user is not None and settings.basic_auth_password is not None
    expected_user = settings.basic_auth_user.encode()
    expected_password = settings.basic_auth_password.get_secret_value().encode()
    parse = HTTPBasic(auto_error=False, realm=_REALM)

    async def require_credentials(request: Request) -> None:
        given = await parse(request)
        user = given.username.encode() if given else b""
        password = given.password.encode() if given else b""
        # Compare both in constant time, and always both, so timing reveals neither.
        user_ok = secrets.compare_digest(user, expected_user)
        password_ok = secrets.compare_digest(password, expected_password)
        if not (given and user_ok and password_ok):
            raise HTTPException(
                status_code=status.HTTP_401_UNAUTHORIZED,
                detail="invalid or missing basic auth credentials",
                headers={"WWW-Authenticate": f'Basic realm="{_REALM}"'},
            )

    return require_credentials


def same_origin_guard(settings: EmbeddedGatewaySettings) -> Callable[[Request], object]:
    """A FastAPI dependency that keeps web pages in a user's browser out of /system/*.

    A cross-site page can send "simple" requests (form or text/plain bodies) without a CORS preflight:
    bodies must be declared JSON, which a page can only send after a preflight this gateway never
    grants. Without credentials, a page could still resolve its own name to 127.0.0.1 (DNS rebinding)
    and be same-origin: there the Host header must name the loopback address itself.
    """

    async def require_same_origin(request: Request) -> None:
        if not settings.auth_enabled and not is_loopback(_host_name(request.headers.get("host", ""))):
            raise ForbiddenHost("/system/* of a gateway without credentials answers only to a loopback Host")
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if request.method not in _READS and media_type != _JSON:
            raise UnsupportedMediaType(f"/system/* bodies must be sent as Content-Type: {_JSON}")

    return require_same_origin


def _host_name(host_header: str) -> str:
    """The name in a Host header ("localhost:8080", "[::1]:8080"); "" when it has none."""
    if any(c in host_header for c in "@/?#\\"):  # a URL's other parts: no browser sends them as a Host
        return ""
    try:
        return urlsplit("//" + host_header).hostname or ""
    except ValueError:  # an unbalanced bracket
        return ""


# --- the gateway as a child process ------------------------------------------------------------


class GatewayProcess(ServiceProcess):
    """``with GatewayProcess(...) as gateway:``; ``gateway.url`` is its base URL; ``args`` are `faasmoe gateway`'s."""

    name = "gateway"
    health_path = "/healthz"

    def command(self) -> list[str]:
        return [sys.executable, "-m", CLI_MODULE, GATEWAY_SUBCOMMAND, "--host", self.host, "--port", str(self.port),
                *self.args]  # fmt: skip

    def function_processes(self) -> list[psutil.Process]:
        """The function replicas the gateway runs: its descendants but the zygote they may be forked from."""
        return [p for p in self.descendants() if not is_zygote(p, self.pid)]


def is_gateway(process: psutil.Process) -> bool:
    """Whether ``process`` is an embedded gateway (started as GatewayProcess does, or as `faasmoe gateway`)."""
    try:
        command = process.cmdline()
    except psutil.Error:
        return False
    for index, part in enumerate(command[:-1]):
        if (part == CLI_MODULE or part.endswith("/faasmoe")) and command[index + 1] == GATEWAY_SUBCOMMAND:
            return True
    return False


def is_zygote(process: psutil.Process, gateway_pid: int) -> bool:
    """Whether ``process`` is the gateway's function runtime (faasmoe.function.zygote), not a replica."""
    # Forked replicas run the zygote's command line too, but are its children, not the gateway's.
    try:
        return process.ppid() == gateway_pid and ZYGOTE_MODULE in process.cmdline()
    except psutil.NoSuchProcess:
        return False
