"""Invocation (/function/*), /healthz and /metrics: the gateway's unauthenticated routes."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from faasmoe.gateway.embedded.errors import status_of
from faasmoe.gateway.embedded.runtime import runtime_of

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

router = APIRouter()


@router.api_route("/function/{name}", methods=_METHODS)
async def invoke(name: str, request: Request) -> Response:
    return await _invoke(name, request)


@router.api_route("/function/{name}/{path:path}", methods=_METHODS)
async def invoke_path(name: str, path: str, request: Request) -> Response:
    return await _invoke(name, request)  # the proxy forwards the path as the caller sent it, still encoded


async def _invoke(name: str, request: Request) -> Response:
    runtime = runtime_of(request)
    # "name.namespace" addresses a namespace in OpenFaaS; this gateway has only one.
    name = name.split(".", 1)[0]
    pool = runtime.registry.pool(name)  # unknown names answer 404 and are not counted
    pool.invocation_count += 1
    started = time.perf_counter()
    try:
        response = await runtime.proxy.forward(pool, request)
    except Exception as exc:
        runtime.metrics.observe_invocation(name, status_of(exc), time.perf_counter() - started)
        raise
    runtime.metrics.observe_invocation(name, response.status_code, time.perf_counter() - started)
    return response


@router.get("/healthz")
async def healthz() -> PlainTextResponse:
    return PlainTextResponse("OK")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    runtime = runtime_of(request)
    replicas = {name: runtime.registry.pool(name).desired for name in runtime.registry.names()}
    return Response(runtime.metrics.render(replicas), media_type=runtime.metrics.content_type)
