"""The deployed functions and their replicas: scale from zero, forwarding invocations, scaling, idling to zero.

``FunctionRegistry`` holds the deployed functions (deploy, update, delete, scale, status) and runs the
idle reaper; each function's ``FunctionPool`` keeps its replicas and forwards invocations to them;
``ReplicaLauncher`` runs a replica (exec'd, or forked from the zygote) until it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import shlex
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
from starlette.requests import Request
from starlette.responses import Response

from faasmoe.errors import BadRequest, FaasmoeError
from faasmoe.function.headers import IDLE_HEADER
from faasmoe.gateway.embedded.config import (
    NAMESPACE,
    EmbeddedGatewaySettings,
    ScalePolicy,
    check_runnable,
    command_of,
    default_function_command,
    inherited,
    replica_environment,
)
from faasmoe.gateway.embedded.forkserver import ForkServer
from faasmoe.gateway.embedded.replica import Replica, ReplicaLost, ReplicaState, ReplicaUnavailable
from faasmoe.gateway.schemas import DIRECT_URL_HEADER, FunctionDeployment, FunctionStatus
from faasmoe.process import free_port, listening_socket
from faasmoe.request_body import read_body

logger = logging.getLogger(__name__)

CALL_ID_HEADER = "X-Call-Id"
# Where replicas listen: only this gateway talks to them.
_REPLICA_HOST = "127.0.0.1"
_LIVE = (ReplicaState.STARTING, ReplicaState.READY)
# The one retry of the gateway: a request that never reached a function (a refused connection, a replica
# that died holding it unanswered, or was killed from outside while starting) is sent once more, to a
# fresh replica. A function that failed to load or crashed by itself is final, and not retried.
_ATTEMPTS = 2
# How long a broken connection waits to learn whether its replica died.
_DEATH_GRACE_S = 0.5
# Forwarding to replicas: connections are pooled and kept alive; a connect is quick on loopback.
_CONNECT_TIMEOUT_S = 5.0
# How long the reaper waits for a replica to tell its idle time (it answers from its event loop).
_IDLE_PROBE_S = 1.0
_MAX_CONNECTIONS = 256
_MAX_KEEPALIVE = 64
# OpenFaaS function names are DNS-1123 labels; that also keeps them safe as log file names.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_MAX_NAME_LENGTH = 63

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are not forwarded; length
# and encoding are recomputed for the body actually sent (httpx decodes compressed bodies).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_NOT_RETURNED = _HOP_BY_HOP | {"content-encoding", "date", "server"}
# What stays as it is in a forwarded path: RFC 3986's path characters and escapes; anything else is escaped.
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"


class UnknownFunction(FaasmoeError):
    """No function of that name is deployed (HTTP 404)."""


class FunctionExists(BadRequest):
    """A POST deploy named a function that is already deployed (HTTP 400, as in OpenFaaS)."""


class FunctionPool:
    """Keeps ``desired`` replicas of one deployed function and forwards invocations to them.

    ``desired`` is what the status calls ``replicas``; ready replicas are ``availableReplicas``.
    A replica that died after it was ready is forgotten and replaced on the next request. A replica that
    failed to start (its shard did not load, it crashed or timed out) is final: that failure answers the
    requests waiting for it, and every request for ``start_failure_cooldown_s`` after (or until the function
    is updated) without starting another, so a broken function costs no restart loop. Only a replica
    killed from outside while starting (a signal, its zygote's death) is started again for the same request.
    """

    def __init__(
        self,
        deployment: FunctionDeployment,
        policy: ScalePolicy,
        launcher: ReplicaLauncher,
        settings: EmbeddedGatewaySettings,
    ) -> None:
        self.deployment = deployment
        self.policy = policy
        self.created_at = datetime.now(timezone.utc)
        self.desired = policy.min_replicas
        self.invocation_count = 0
        self.in_flight = 0
        self.last_used = time.monotonic()
        self._launcher = launcher
        self._settings = settings
        self._failure: FaasmoeError | None = None  # the last start failure, final until it cools down
        self._failed_at = 0.0
        self._replicas: list[Replica] = []
        self._turn = itertools.count()
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def name(self) -> str:
        return self.deployment.service

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas)

    def ready_count(self) -> int:
        return sum(r.state is ReplicaState.READY for r in self._replicas)

    # --- requests ---------------------------------------------------------------------------

    async def forward(self, request: Request) -> Response:
        """Send ``request`` to a ready replica and return the function's answer.

        Raises BodyTooLarge (HTTP 413) before buffering an over-size body, FunctionFailed (500) when the
        function cannot load, ReplicaUnavailable (502) when no replica answers. Messages name the function,
        never the replica's address: that, and the cause in full, go to the gateway's log.
        """
        body = await read_body(request, self._settings.max_body_bytes)
        headers = [
            (k, v)
            for k, v in request.headers.items()
            if k.lower() not in _HOP_BY_HOP and k.lower() not in ("x-call-id", "x-forwarded-for")
        ]
        headers.append((CALL_ID_HEADER, request.state.call_id))
        if request.client is not None:
            forwarded = request.headers.get("x-forwarded-for")
            client = request.client.host
            headers.append(("X-Forwarded-For", f"{forwarded}, {client}" if forwarded else client))
        target = upstream_target(request)
        http = self._launcher.http

        for attempt in range(_ATTEMPTS):
            last = attempt == _ATTEMPTS - 1
            try:
                async with self.lease() as replica:
                    try:
                        url = replica.url + target
                        upstream = await http.request(request.method, url, content=body, headers=headers)
                        served_by = replica
                    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                        # Never reached the function (the replica died or is shutting down): replace it.
                        self.report_unreachable(replica)
                        if last:
                            raise self._unavailable(replica, "is unreachable", exc) from exc
                        continue
                    except httpx.TimeoutException as exc:
                        raise self._unavailable(replica, "timed out", exc) from exc
                    except httpx.TransportError as exc:
                        # The connection broke: if the process died (killed, crashed), the request died with
                        # it unanswered; a dying process closes its sockets just before it can be reaped.
                        if not last and await replica.exits_within(_DEATH_GRACE_S):
                            self.report_unreachable(replica)
                            continue
                        raise self._unavailable(replica, "broke the connection", exc) from exc
                    except httpx.HTTPError as exc:
                        raise self._unavailable(replica, "failed", exc) from exc
            except ReplicaLost:
                if last:
                    raise
                continue  # killed from outside while starting: the next attempt starts another
            response = Response(content=upstream.content, status_code=upstream.status_code)
            for key, value in upstream.headers.multi_items():
                if key.lower() not in _NOT_RETURNED:
                    response.headers.append(key, value)
            if self.publishes_replicas:
                response.headers[DIRECT_URL_HEADER] = served_by.url
            return response
        raise AssertionError("unreachable: the loop returns or raises on its last attempt")

    def _unavailable(self, replica: Replica, what: str, cause: Exception) -> ReplicaUnavailable:
        logger.warning("function %s: replica pid %s at %s %s: %r", self.name, replica.pid, replica.url, what, cause)
        return ReplicaUnavailable(f"function {self.name!r} {what}")

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Replica]:
        """A ready replica for one request, counted in flight (and not idle) while held."""
        self.in_flight += 1
        self.last_used = time.monotonic()
        try:
            replica = await self._acquire()
            replica.in_flight += 1
            try:
                yield replica
            finally:
                replica.in_flight -= 1
        finally:
            self.in_flight -= 1
            self.last_used = time.monotonic()

    async def _acquire(self) -> Replica:
        """A ready replica, starting one (and holding the caller until it is ready) if none is."""
        timeout_s = self._settings.cold_start_timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            if self._closed:
                raise ReplicaUnavailable(f"function {self.name!r} was deleted while the request waited")
            self.forget_exited()
            ready = [r for r in self._replicas if r.state is ReplicaState.READY]
            if ready:
                self.reconcile()  # replaces replicas that died, in the background
                return self._least_loaded(ready)
            if (failure := self.recent_failure()) is not None:
                raise _again(failure)
            # Scale from zero; callers arriving meanwhile wait for the same starting replica.
            self.desired = max(self.desired, self.policy.clamp(1))
            self.reconcile()
            starting = [r.startup for r in self._replicas if r.startup and not r.startup.done()]
            remaining = deadline - time.monotonic()
            if not starting or remaining <= 0:
                raise ReplicaUnavailable(f"function {self.name!r}: no replica ready within {timeout_s:g} s")
            done, _ = await asyncio.wait(starting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = None if task.cancelled() else task.exception()
                if error is not None and not self.ready_count():
                    raise _again(error)  # a ReplicaLost is retried by forward()

    def recent_failure(self) -> FaasmoeError | None:
        """The last start failure while it is final (within the cooldown), else None."""
        if self._failure is not None and time.monotonic() - self._failed_at >= self._settings.start_failure_cooldown_s:
            self._failure = None
        return self._failure

    def _least_loaded(self, ready: list[Replica]) -> Replica:
        # Rotating the start makes ties (the common case) go round robin.
        start = next(self._turn) % len(ready)
        rotated = ready[start:] + ready[:start]
        return min(rotated, key=lambda r: r.in_flight)

    def report_unreachable(self, replica: Replica) -> None:
        """The replica refused a connection: drop it so the next lease starts a fresh one."""
        if replica in self._replicas:
            logger.warning("function %s: replica pid %s unreachable; replacing it", self.name, replica.pid)
            self._stop(replica)

    # --- scaling ----------------------------------------------------------------------------

    def scale(self, replicas: int) -> int:
        """Set the desired replica count (clamped to the policy); returns the count applied."""
        self.desired = self.policy.clamp(replicas)
        # Replicas asked for now are not "idle since the last request" yet.
        self.last_used = time.monotonic()
        self.reconcile()
        return self.desired

    def forget_exited(self) -> None:
        for replica in [r for r in self._replicas if r.state is not ReplicaState.STARTING]:
            if replica.has_exited():
                logger.warning(
                    "function %s: replica pid %s exited with code %s; log %s",
                    self.name,
                    replica.pid,
                    replica.process.returncode if replica.process else None,
                    replica.log_path,
                )
                replica.state = ReplicaState.EXITED
                self._replicas.remove(replica)

    def reconcile(self) -> None:
        """Start or stop replicas until the live ones match ``desired``."""
        live = [r for r in self._replicas if r.state in _LIVE]
        if self.recent_failure() is None:  # a function that just failed to start is not restarted in a loop
            for _ in range(self.desired - len(live)):
                self._start_replica()
        surplus = len(live) - self.desired
        if surplus > 0:
            # Stop starting replicas first, then the least busy ready ones.
            order = sorted(live, key=lambda r: (r.state is ReplicaState.READY, r.in_flight))
            for replica in order[:surplus]:
                self._stop(replica)

    @property
    def publishes_replicas(self) -> bool:
        """Whether callers learn this function's replica addresses (the direct path): faasmoe's function
        server only, which refuses a call meant for another function and reports its own idle time."""
        return self._settings.direct_replicas and self._launcher.runs_function_server(self.deployment)

    async def count_direct_calls(self, now: float) -> None:
        """Before an idle check: calls that went straight to a replica count as use, as the replica tells
        on its ready path (seconds since its last invocation)."""
        if not self.publishes_replicas or self.idle_for(now) < self.policy.idle_timeout_s:
            return
        for replica in [r for r in self._replicas if r.state is ReplicaState.READY]:
            try:
                ready = await self._launcher.http.get(replica.url + self.policy.ready_path, timeout=_IDLE_PROBE_S)
                idle = float(ready.headers[IDLE_HEADER])
            except (httpx.HTTPError, KeyError, ValueError):
                continue  # gone or not telling: the gateway's own count stands
            self.last_used = max(self.last_used, now - idle)

    def idle_for(self, now: float) -> float:
        return 0.0 if self.in_flight else now - self.last_used

    def scale_down_if_idle(self, now: float) -> bool:
        """Scale to the minimum when idle past the idle timeout; True if replicas were stopped."""
        if not self.policy.scale_to_zero or self.desired <= self.policy.min_replicas:
            return False
        if self.idle_for(now) < self.policy.idle_timeout_s:
            return False
        logger.info(
            "function %s: idle for %.1f s; scaling to %d", self.name, self.idle_for(now), self.policy.min_replicas
        )
        self.scale(self.policy.min_replicas)
        return True

    def relabel(self, deployment: FunctionDeployment, policy: ScalePolicy) -> None:
        """Take a deployment that runs what this one runs and differs in labels only: the replicas keep running
        (as the labels are metadata), and the scale policy read from them applies from now on."""
        self.deployment = deployment
        self.policy = policy
        self._failure = None  # as any update clears it
        self.desired = policy.clamp(self.desired)
        self.reconcile()

    async def redeploy(self, deployment: FunctionDeployment, policy: ScalePolicy) -> None:
        """Replace the deployment: old replicas stop, new ones start with the new environment."""
        old = list(self._replicas)
        # Switch first, so a request arriving meanwhile starts a replica of the new deployment.
        self.deployment = deployment
        self.policy = policy
        self._failure = None  # the new deployment may well start
        self.desired = policy.clamp(self.desired)
        for replica in old:
            self._stop(replica)
        # Old processes go before new ones start, so two sets of (possibly large) weights do
        # not coexist.
        await self.settled()
        self.reconcile()

    async def close(self) -> None:
        """Stop every replica and wait until their processes are gone."""
        self._closed = True
        self.desired = 0
        for replica in list(self._replicas):
            self._stop(replica)
        await self.settled()

    async def settled(self) -> None:
        """Return once every replica being stopped is gone."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # --- internals --------------------------------------------------------------------------

    def _start_replica(self) -> None:
        replica = self._launcher.create(self.deployment)
        self._replicas.append(replica)
        replica.startup = asyncio.create_task(self._bring_up(replica, self.deployment, self.policy))
        replica.startup.add_done_callback(self._log_failed_start)

    async def _bring_up(self, replica: Replica, deployment: FunctionDeployment, policy: ScalePolicy) -> None:
        try:
            await self._launcher.start(replica, deployment, policy.ready_path)
        except ReplicaLost:
            self._forget(replica)
            raise
        except FaasmoeError as exc:
            self._forget(replica)
            self._remember(exc, deployment)
            raise
        except Exception as exc:  # a bug, not the function's doing: still one failure, said plainly
            self._forget(replica)
            logger.exception("function %s: starting a replica failed", self.name)
            failure = ReplicaUnavailable(f"function {self.name!r}: the gateway could not start a replica")
            self._remember(failure, deployment)
            raise failure from exc
        except BaseException:  # cancelled: scaled down or deleted
            self._forget(replica)
            raise

    def _forget(self, replica: Replica) -> None:
        if replica in self._replicas:
            self._replicas.remove(replica)

    def _remember(self, failure: FaasmoeError, deployment: FunctionDeployment) -> None:
        if deployment is self.deployment:  # a failure of the deployment an update replaced says nothing now
            self._failure = failure
            self._failed_at = time.monotonic()

    def _log_failed_start(self, task: asyncio.Task[None]) -> None:
        # Retrieving the exception here also keeps asyncio from warning it was never retrieved.
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s", task.exception())

    def _stop(self, replica: Replica) -> None:
        self._forget(replica)
        if replica.startup is not None and not replica.startup.done():
            replica.startup.cancel()  # its cleanup stops the process
            task = replica.startup
        else:
            task = asyncio.create_task(replica.stop(self._settings.stop_grace_s))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def runs_the_same(old: FunctionDeployment, new: FunctionDeployment) -> bool:
    """Whether two deployments of a function differ at most in their labels: the same image, command,
    environment, annotations (the ready path among them) and resources, so the same processes."""
    return old.model_copy(update={"labels": {}}) == new.model_copy(update={"labels": {}})


def _again(failure: BaseException) -> BaseException:
    """A fresh exception saying what ``failure`` said, for one more request (tracebacks are not shared)."""
    return type(failure)(str(failure))


def upstream_target(request: Request) -> str:
    """``/function/NAME/REST?QUERY`` -> ``/REST?QUERY``, percent-encoded as the caller sent it.

    Forwarding the raw bytes (rather than the decoded path) is what a proxy does: the function decodes
    its own path, and an escape such as %1F or %2F reaches it unchanged.
    """
    raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
    rest = raw_path.split(b"/", 3)[3:]  # b"", b"function", NAME, REST
    target = "/" + quote_from_bytes(rest[0] if rest else b"", safe=_PATH_SAFE)
    query: bytes = request.scope.get("query_string", b"")
    if query:
        target += "?" + quote_from_bytes(query, safe=_PATH_SAFE + "?")
    return target


class ReplicaLauncher:
    """Creates replicas of deployed functions: picks a port, builds the environment, spawns."""

    def __init__(
        self, settings: EmbeddedGatewaySettings, http: httpx.AsyncClient, log_dir: Path, forkserver: ForkServer | None
    ) -> None:
        self.settings = settings
        self.http = http  # one pooled client for readiness probes and forwarding
        self.log_dir = log_dir
        self.forkserver = forkserver  # None: every replica is exec'd

    def create(self, deployment: FunctionDeployment) -> Replica:
        return Replica(deployment.service, _REPLICA_HOST, self.log_path(deployment.service))

    def log_path(self, function: str) -> Path:
        return self.log_dir / f"{function}.log"

    def runs_function_server(self, deployment: FunctionDeployment) -> bool:
        """Whether the deployment runs faasmoe's own function server (not an envProcess or another command)."""
        return not deployment.env_process and self.settings.function_command == default_function_command()

    def forkserver_for(self, deployment: FunctionDeployment) -> ForkServer | None:
        """The zygote that forks this function's replicas: faasmoe's function server only, and only in fork mode."""
        return self.forkserver if self.runs_function_server(deployment) else None

    def prepare(self, deployment: FunctionDeployment) -> None:
        """On deploy: start the zygote now if this function forks, so its first cold start need not import."""
        if (forkserver := self.forkserver_for(deployment)) is not None:
            forkserver.start()

    async def start(self, replica: Replica, deployment: FunctionDeployment, ready_path: str) -> None:
        """Spawn ``replica`` and wait until it is ready; on failure its process is stopped."""
        command = command_of(self.settings, deployment)
        try:
            environment = replica_environment(self.settings, deployment, replica.host)
            if (forkserver := self.forkserver_for(deployment)) is not None:
                await replica.fork(forkserver, environment)  # the zygote binds its socket
            elif self.runs_function_server(deployment):  # it serves on a socket bound here: no port race
                with listening_socket(replica.host) as sock:
                    fd, port = sock.fileno(), sock.getsockname()[1]
                    environment |= {"FAASMOE_LISTEN_FD": str(fd), "FAASMOE_PORT": str(port)}
                    await replica.spawn(command, environment, port, pass_fds=(fd,))
            else:  # another program binds the port it is told, as behind of-watchdog
                port = free_port(replica.host)
                await replica.spawn(command, environment | {"FAASMOE_PORT": str(port)}, port)
            await replica.wait_ready(self.http, ready_path, self.settings.cold_start_timeout_s)
        except OSError as exc:
            replica.state = ReplicaState.EXITED
            logger.error("function %s: cannot run %s: %s", deployment.service, shlex.join(command), exc)
            reason = exc.strerror or type(exc).__name__  # without the gateway machine's paths
            raise ReplicaUnavailable(f"function {deployment.service!r}: cannot run its command: {reason}") from exc
        except BaseException:
            # Failed, timed out or cancelled (scaled down, deleted): leave no process behind.
            await asyncio.shield(replica.stop(self.settings.stop_grace_s))
            raise


class FunctionRegistry:
    """The deployed functions and what runs them: deploy, update, delete, scale, status, and the idle reaper."""

    def __init__(self, settings: EmbeddedGatewaySettings, launcher: ReplicaLauncher) -> None:
        self.settings = settings
        self.launcher = launcher
        self._pools: dict[str, FunctionPool] = {}
        self._reaper: asyncio.Task[None] | None = None

    @classmethod
    def start(cls, settings: EmbeddedGatewaySettings) -> FunctionRegistry:
        """An empty registry with its HTTP client and idle reaper running (call inside the event loop)."""
        log_dir = settings.log_dir or Path(tempfile.mkdtemp(prefix="faasmoe-gateway-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.upstream_timeout_s, connect=_CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=_MAX_CONNECTIONS, max_keepalive_connections=_MAX_KEEPALIVE),
            # Replicas are on loopback: a proxy from the environment must not intercept them.
            trust_env=False,
        )
        forkserver = None
        if settings.function_spawn == "fork" and sys.platform == "linux":
            runtime_log = log_dir / "function-runtime.log"
            forkserver = ForkServer(runtime_log, settings.cold_start_timeout_s, inherited(settings))
        registry = cls(settings, ReplicaLauncher(settings, http, log_dir, forkserver))
        registry._reaper = asyncio.create_task(registry._run_reaper())
        logger.info("function logs go to %s", log_dir)
        return registry

    def names(self) -> list[str]:
        return sorted(self._pools)

    def pool(self, name: str) -> FunctionPool:
        try:
            return self._pools[name]
        except KeyError:
            raise UnknownFunction(f"function {name!r} not found") from None

    def deploy(self, deployment: FunctionDeployment) -> None:
        _check_name(deployment.service)
        if deployment.service in self._pools:
            raise FunctionExists(
                f"function {deployment.service!r} already exists: update it with PUT /system/functions"
            )
        check_runnable(self.settings, deployment)
        policy = ScalePolicy.for_deployment(deployment, self.settings)
        self.launcher.prepare(deployment)
        pool = FunctionPool(deployment, policy, self.launcher, self.settings)
        self._pools[deployment.service] = pool
        pool.reconcile()  # starts the minimum replicas, if any
        logger.info("function %s deployed (log %s)", deployment.service, self.launcher.log_path(pool.name))

    async def update(self, deployment: FunctionDeployment) -> None:
        pool = self.pool(deployment.service)
        check_runnable(self.settings, deployment)
        policy = ScalePolicy.for_deployment(deployment, self.settings)
        if runs_the_same(pool.deployment, deployment):  # e.g. a new zero-duration: no restart
            pool.relabel(deployment, policy)
            logger.info("function %s relabelled; its replicas keep running", deployment.service)
            return
        self.launcher.prepare(deployment)
        await pool.redeploy(deployment, policy)
        logger.info("function %s updated", deployment.service)

    async def delete(self, name: str) -> None:
        pool = self.pool(name)
        del self._pools[name]
        await pool.close()
        logger.info("function %s deleted", name)

    def scale(self, name: str, replicas: int) -> int:
        return self.pool(name).scale(replicas)

    def status(self, name: str) -> FunctionStatus:
        pool = self.pool(name)
        pool.forget_exited()
        deployment = pool.deployment
        return FunctionStatus(
            **dict(deployment, namespace=deployment.namespace or NAMESPACE),
            invocation_count=pool.invocation_count,
            replicas=pool.desired,
            available_replicas=pool.ready_count(),
            created_at=pool.created_at,
        )

    def statuses(self) -> list[FunctionStatus]:
        return [self.status(name) for name in self.names()]

    def reap_once(self, now: float | None = None) -> None:
        """Forget dead replicas and scale idle functions down to their minimum."""
        now = time.monotonic() if now is None else now
        for pool in list(self._pools.values()):
            pool.forget_exited()
            pool.scale_down_if_idle(now)

    async def _run_reaper(self) -> None:
        """Loop forever (until cancelled), reaping every ``reaper_interval_s``."""
        while True:
            await asyncio.sleep(self.settings.reaper_interval_s)
            try:
                now = time.monotonic()
                for pool in list(self._pools.values()):
                    await pool.count_direct_calls(now)
                self.reap_once(now)
            except Exception:  # a bug here must not end scale-to-zero for the gateway's lifetime
                logger.exception("reaper failed")

    async def close(self) -> None:
        """Stop the reaper and every function's processes (gateway shutdown), then the zygote and HTTP client."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        pools = list(self._pools.values())
        self._pools.clear()
        await asyncio.gather(*(pool.close() for pool in pools), return_exceptions=True)
        if self.launcher.forkserver is not None:
            await self.launcher.forkserver.close()
        await self.launcher.http.aclose()


def _check_name(name: str) -> None:
    if len(name) > _MAX_NAME_LENGTH or not _NAME.fullmatch(name):
        raise BadRequest(
            f"invalid function name {name!r}: use lowercase letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {_MAX_NAME_LENGTH} characters"
        )
