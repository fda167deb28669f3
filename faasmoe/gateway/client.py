"""Async client for an OpenFaaS gateway (the real one or faasmoe's embedded one).

One pooled ``httpx.AsyncClient`` with keep-alive connections serves every call. Answers that mean
"busy / starting" are retried with bounded exponential backoff, honouring ``Retry-After``: 429, 503,
of-watchdog's own 500 (its upstream, the function server, is not listening yet: on OpenFaaS CE a pod is
Ready before its weights load), and connection failures where the request never reached the function.
A function's own 500 (it failed to load) and a gateway's 502 (the function crashed) are final.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Mapping
from types import TracebackType
from urllib.parse import quote

import httpx
from pydantic import BaseModel, Field, SecretStr

from faasmoe.errors import FaasmoeError
from faasmoe.function.headers import FUNCTION_HEADER
from faasmoe.gateway.schemas import DeleteFunctionRequest, FunctionDeployment, FunctionStatus, ScaleServiceRequest

# Failures after which the request certainly did not reach the function, or the pooled
# keep-alive connection had gone stale: safe to send again.
_RETRYABLE_TRANSPORT_ERRORS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.PoolTimeout,
)
_ERROR_BODY_CHARS = 500
# of-watchdog marks the answers it gives itself (not its function's) with this header.
WATCHDOG_HEADER = "X-OpenFaaS-Internal"
WATCHDOG = "of-watchdog"


class GatewayError(FaasmoeError):
    """A gateway call failed: ``status`` is the HTTP status (None when no response came)."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class FunctionNotFound(GatewayError):
    """The gateway has no function of that name (HTTP 404)."""


class RetryPolicy(BaseModel):
    """Bounded exponential backoff for transient gateway answers."""

    attempts: int = Field(default=4, ge=1, description="tries in all, the first included")
    base_delay_s: float = Field(default=0.1, ge=0)
    max_delay_s: float = Field(default=2.0, ge=0)
    max_retry_after_s: float = Field(default=30.0, ge=0, description="cap on a server's Retry-After")
    retry_statuses: frozenset[int] = frozenset({429, 503})

    def retries(self, response: httpx.Response) -> bool:
        """Whether ``response`` says "busy / starting": a retry may succeed."""
        if response.status_code in self.retry_statuses:
            return True
        # The watchdog's own 500: its function server is not up yet (the function's own 500 is final).
        return response.status_code == httpx.codes.INTERNAL_SERVER_ERROR and (
            response.headers.get(WATCHDOG_HEADER) == WATCHDOG
        )

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before try ``attempt + 1`` (attempt counts from 0)."""
        server_delay = _parse_retry_after(retry_after)
        if server_delay is not None:
            return min(server_delay, self.max_retry_after_s)
        backoff = min(self.max_delay_s, self.base_delay_s * 2**attempt)
        # Jitter keeps many callers that failed together from retrying together.
        return backoff * random.uniform(0.5, 1.0)


class GatewaySettings(BaseModel):
    """Where the gateway is and how to talk to it."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8080")
    username: str | None = None
    password: SecretStr | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Invocations may hold while a function cold-starts and loads weights: be generous.
    timeout_s: float = Field(default=300.0, gt=0, description="read/write/pool timeout")
    max_connections: int = Field(default=100, ge=1)
    max_keepalive_connections: int = Field(default=20, ge=0)
    keepalive_expiry_s: float = Field(default=30.0, ge=0)
    trust_env: bool = Field(default=True, description="honour HTTP(S)_PROXY, NO_PROXY and SSL_CERT_FILE")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)

    @classmethod
    def from_url(cls, url: str, basic_auth: str | None = None) -> GatewaySettings:
        """Settings from a URL and an optional USER:PASSWORD, as the CLI takes them."""
        if basic_auth is None:
            return cls(base_url=url)
        user, password = parse_basic_auth(basic_auth)
        return cls(base_url=url, username=user, password=password)


def parse_basic_auth(value: str) -> tuple[str, str]:
    """``USER:PASSWORD`` -> (user, password); the password may contain ':'."""
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("basic auth must be given as USER:PASSWORD, both non-empty")
    return user, password


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class GatewayClient:
    """Calls the OpenFaaS gateway REST API. Use as ``async with GatewayClient(settings) as gw``."""

    def __init__(self, settings: GatewaySettings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self._auth: httpx.BasicAuth | None = None
        if settings.username is not None and settings.password is not None:
            self._auth = httpx.BasicAuth(settings.username, settings.password.get_secret_value())
        self._http = httpx.AsyncClient(
            base_url=settings.base_url.rstrip("/"),
            timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=settings.max_keepalive_connections,
                keepalive_expiry=settings.keepalive_expiry_s,
            ),
            transport=transport,
            trust_env=settings.trust_env,
        )

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- invocation -------------------------------------------------------------------------

    async def invoke(
        self,
        name: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        *,
        path: str = "",
        method: str = "POST",
        check: bool = True,
    ) -> httpx.Response:
        """Call function ``name`` (``/function/{name}[/path]``) and return its response.

        With ``check`` (the default) a status >= 400 raises GatewayError (FunctionNotFound on
        404); without it the caller gets the response whatever its status.
        """
        url = f"/function/{quote(name, safe='')}"
        if path:
            url += "/" + path.lstrip("/")
        response = await self._request(method, url, content=body, headers=headers)
        if check:
            self._raise_for_status(response, f"invoking function {name!r}", not_found=name)
        return response

    async def invoke_replica(
        self, url: str, name: str, body: bytes, headers: Mapping[str, str]
    ) -> httpx.Response | None:
        """One try straight to a replica the gateway named (faasmoe.dispatch.direct): its answer if 200, else
        None, and the caller goes through the gateway. No credentials go with it: replicas take none."""
        try:
            response = await self._http.post(url, content=body, headers={**headers, FUNCTION_HEADER: name})
        except httpx.HTTPError:
            return None
        return response if response.status_code == httpx.codes.OK else None

    # --- /system ----------------------------------------------------------------------------

    async def list_functions(self, namespace: str | None = None) -> list[FunctionStatus]:
        response = await self._system("GET", "/system/functions", params=_namespace(namespace))
        self._raise_for_status(response, "listing functions")
        return [FunctionStatus.model_validate(item) for item in response.json()]

    async def get_function(self, name: str, namespace: str | None = None) -> FunctionStatus:
        """One function's status; raises FunctionNotFound if it is not deployed."""
        response = await self._system("GET", f"/system/function/{quote(name, safe='')}", params=_namespace(namespace))
        self._raise_for_status(response, f"reading function {name!r}", not_found=name)
        return FunctionStatus.model_validate(response.json())

    async def scale(self, name: str, replicas: int, namespace: str | None = None) -> None:
        """Sets the function's desired replicas: lowers them too (OpenFaaS's scale API sets a count)."""
        body = ScaleServiceRequest(service_name=name, replicas=replicas, namespace=namespace).to_wire()
        response = await self._system("POST", f"/system/scale-function/{quote(name, safe='')}", json=body)
        self._raise_for_status(response, f"scaling function {name!r}", not_found=name)

    async def scale_from_zero(self, name: str, namespace: str | None = None) -> tuple[FunctionStatus, bool]:
        """Asks for one replica only if the function has none; returns its status as read and whether it asked.

        Never lowers a function: as the OpenFaaS gateway's own scale from zero does, it reads the desired
        count first and scales only from 0. Between the read and the scale only an autoscaler acting within
        those milliseconds could have raised it, and would raise it again.
        """
        status = await self.get_function(name, namespace)
        if status.replicas > 0:
            return status, False
        await self.scale(name, 1, namespace)
        return status, True

    async def deploy(self, deployment: FunctionDeployment) -> None:
        response = await self._system("POST", "/system/functions", json=deployment.to_wire())
        self._raise_for_status(response, f"deploying function {deployment.service!r}")

    async def update(self, deployment: FunctionDeployment) -> None:
        response = await self._system("PUT", "/system/functions", json=deployment.to_wire())
        self._raise_for_status(response, f"updating function {deployment.service!r}", not_found=deployment.service)

    async def delete(self, name: str, namespace: str | None = None) -> None:
        body = DeleteFunctionRequest(function_name=name).to_wire()
        response = await self._system("DELETE", "/system/functions", json=body, params=_namespace(namespace))
        self._raise_for_status(response, f"deleting function {name!r}", not_found=name)

    async def healthz(self) -> bool:
        """True when the gateway answers 200 on /healthz; one try, no retries, never raises."""
        try:
            response = await self._http.get("/healthz")
        except httpx.HTTPError:
            return False
        return response.status_code == httpx.codes.OK

    # --- plumbing ---------------------------------------------------------------------------

    async def _system(
        self,
        method: str,
        url: str,
        *,
        json: object = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        # Only /system/* carries credentials: function calls never need them.
        return await self._request(method, url, json=json, params=params, auth=self._auth)

    async def _request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        json: object = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        auth: httpx.Auth | None = None,
    ) -> httpx.Response:
        policy = self.settings.retry
        for attempt in range(policy.attempts):
            last = attempt == policy.attempts - 1
            try:
                response = await self._http.request(
                    method, url, content=content, json=json, params=params, headers=headers, auth=auth
                )
            except _RETRYABLE_TRANSPORT_ERRORS as exc:
                if last:
                    raise GatewayError(
                        f"{method} {self._http.base_url}{url}: gateway unreachable after "
                        f"{policy.attempts} tries: {exc!r}"
                    ) from exc
                await asyncio.sleep(policy.delay(attempt))
                continue
            except httpx.HTTPError as exc:
                raise GatewayError(f"{method} {self._http.base_url}{url} failed: {exc!r}") from exc
            if policy.retries(response) and not last:
                await asyncio.sleep(policy.delay(attempt, response.headers.get("retry-after")))
                continue
            return response
        raise AssertionError("unreachable: the loop returns or raises on its last attempt")

    def _raise_for_status(self, response: httpx.Response, what: str, *, not_found: str | None = None) -> None:
        if response.is_success:
            return
        body = response.text[:_ERROR_BODY_CHARS]
        if response.status_code == httpx.codes.NOT_FOUND and not_found is not None:
            raise FunctionNotFound(
                f"{what}: function {not_found!r} not found on gateway {self._http.base_url} (HTTP 404: {body.strip()})",
                status=response.status_code,
                body=body,
            )
        raise GatewayError(
            f"{what}: gateway {self._http.base_url} answered HTTP {response.status_code}: {body.strip()}",
            status=response.status_code,
            body=body,
        )


def _namespace(namespace: str | None) -> dict[str, str]:
    return {"namespace": namespace} if namespace else {}
