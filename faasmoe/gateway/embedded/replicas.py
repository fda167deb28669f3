"""One replica: a local OS process of a function server, its readiness and its stopping."""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import BinaryIO

import httpx

from faasmoe.gateway.embedded.environment import command_of, replica_environment
from faasmoe.gateway.embedded.errors import FunctionFailed, ReplicaLost, ReplicaUnavailable
from faasmoe.gateway.embedded.forkserver import ForkedProcess, ForkServer
from faasmoe.gateway.embedded.ports import free_port
from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings, default_function_command
from faasmoe.gateway.schemas import FunctionDeployment
from faasmoe.parent_death import die_with_parent

logger = logging.getLogger(__name__)

# How often a stopping process is checked for exit: short, since memory is freed only then.
_EXIT_POLL_S = 0.05
# Log lines quoted in the gateway's log when a replica dies before it is ready.
_LOG_TAIL_LINES = 20
# How much of a function's load error is passed on to the caller.
_LOAD_ERROR_CHARS = 1000


class ReplicaState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    EXITED = "exited"


class Replica:
    """A function server process listening on ``host:port``."""

    def __init__(self, function: str, host: str, port: int, log_path: Path) -> None:
        self.function = function
        self.host = host
        self.port = port
        self.log_path = log_path
        self.state = ReplicaState.STARTING
        self.in_flight = 0
        self.process: subprocess.Popen[bytes] | ForkedProcess | None = None
        # Set by the pool: the task that spawns this replica and waits until it is ready.
        self.startup: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def has_exited(self) -> bool:
        """True once the process is gone (reaping it, so no zombie is left)."""
        return self.process is not None and self.process.poll() is not None

    async def exits_within(self, seconds: float) -> bool:
        """True if the process is gone, or goes within ``seconds``."""
        deadline = time.monotonic() + seconds
        while not self.has_exited():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_EXIT_POLL_S)
        return True

    def spawn(self, command: list[str], env: dict[str, str]) -> None:
        """Runs ``command`` as a new process."""
        with self.log_path.open("ab") as log:
            self._log_start(log, shlex.join(command))
            self.process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: the terminal's Ctrl-C reaches only the gateway, which then
                # stops replicas in order; stop() signals the whole group (helpers included).
                start_new_session=True,
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        logger.info("function %s: replica pid %d starting on port %d", self.function, self.pid, self.port)

    async def fork(self, server: ForkServer, env: dict[str, str]) -> None:
        """Forks the replica from the function runtime's zygote."""
        with self.log_path.open("ab") as log:
            self._log_start(log, "forked from the function runtime")
        self.process = await server.spawn(env, self.log_path)
        logger.info("function %s: replica pid %d forked on port %d", self.function, self.pid, self.port)

    def _log_start(self, log: BinaryIO, how: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"--- {stamp} starting replica on port {self.port}: {how}\n".encode())
        log.flush()

    async def wait_ready(
        self,
        http: httpx.AsyncClient,
        ready_path: str,
        timeout_s: float,
        *,
        poll_interval_s: float,
        probe_timeout_s: float,
    ) -> None:
        """Poll ``ready_path`` until it answers 200.

        Raises FunctionFailed at once when it answers 500 (the function cannot load), ReplicaLost if the
        process is killed by a signal, ReplicaUnavailable if it exits by itself or times out. Messages go
        to callers, who need not be the operator: the replica's log and its address stay in the gateway's log.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if self.has_exited():
                assert self.process is not None
                code = self.process.returncode
                logger.warning(
                    "function %s: replica log %s ends with:\n%s", self.function, self.log_path, self.log_tail()
                )
                if code is not None and code < 0:
                    raise ReplicaLost(
                        f"function {self.function!r}: replica killed by signal {-code} before it was ready"
                    )
                raise ReplicaUnavailable(
                    f"function {self.function!r}: replica exited with code {code} before it was ready"
                )
            try:
                response = await http.get(self.url + ready_path, timeout=probe_timeout_s)
            except httpx.HTTPError:
                response = None  # not listening yet
            if response is not None and response.status_code == httpx.codes.OK:
                self.state = ReplicaState.READY
                logger.info("function %s: replica pid %d ready", self.function, self.pid)
                return
            if response is not None and response.status_code == httpx.codes.INTERNAL_SERVER_ERROR:
                raise FunctionFailed(f"function {self.function!r} failed to load: {_load_error(response)}")
            if time.monotonic() >= deadline:
                logger.warning("function %s: replica not ready; its log: %s", self.function, self.log_path)
                raise ReplicaUnavailable(
                    f"function {self.function!r}: replica not ready at {ready_path} within {timeout_s:g} s "
                    "(the cold-start timeout)"
                )
            await asyncio.sleep(poll_interval_s)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; return once the process is gone."""
        self.state = ReplicaState.STOPPING
        if self.process is None:
            self.state = ReplicaState.EXITED
            return
        if not self.has_exited():
            self._signal_group(signal.SIGTERM)
        if not await self.exits_within(grace_s):
            logger.warning("function %s: replica pid %d ignored SIGTERM; killing", self.function, self.pid)
            self._signal_group(signal.SIGKILL)
            await asyncio.to_thread(self.process.wait)
        # Helpers the server left behind in its group die with it.
        self._signal_group(signal.SIGKILL)
        self.state = ReplicaState.EXITED
        logger.info("function %s: replica pid %d stopped", self.function, self.pid)

    def log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                lines = deque(log, maxlen=_LOG_TAIL_LINES)
        except OSError:
            return ""
        return b"".join(lines).decode(errors="replace")

    def _signal_group(self, signum: signal.Signals) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # already gone


class ReplicaLauncher:
    """Creates replicas of deployed functions: picks a port, builds the environment, spawns."""

    def __init__(
        self, settings: EmbeddedGatewaySettings, http: httpx.AsyncClient, log_dir: Path, forkserver: ForkServer | None
    ) -> None:
        self.settings = settings
        self.http = http
        self.log_dir = log_dir
        self.forkserver = forkserver  # None: every replica is exec'd

    def create(self, deployment: FunctionDeployment) -> Replica:
        host = self.settings.function_host
        return Replica(deployment.service, host, free_port(host), self.log_path(deployment.service))

    def log_path(self, function: str) -> Path:
        return self.log_dir / f"{function}.log"

    def forkserver_for(self, deployment: FunctionDeployment) -> ForkServer | None:
        """The zygote that forks this function's replicas: faasmoe's function server only, and only in fork mode."""
        default = not deployment.env_process and self.settings.function_command == default_function_command()
        return self.forkserver if default else None

    def prepare(self, deployment: FunctionDeployment) -> None:
        """On deploy: start the zygote now if this function forks, so its first cold start need not import."""
        if (forkserver := self.forkserver_for(deployment)) is not None:
            forkserver.start()

    async def start(self, replica: Replica, deployment: FunctionDeployment, ready_path: str) -> None:
        """Spawn ``replica`` and wait until it is ready; on failure its process is stopped."""
        command = command_of(self.settings, deployment)
        try:
            environment = replica_environment(self.settings, deployment, replica.host, replica.port)
            if (forkserver := self.forkserver_for(deployment)) is not None:
                await replica.fork(forkserver, environment)
            else:
                replica.spawn(command, environment)
            await replica.wait_ready(
                self.http,
                ready_path,
                self.settings.cold_start_timeout_s,
                poll_interval_s=self.settings.ready_poll_interval_s,
                probe_timeout_s=self.settings.ready_probe_timeout_s,
            )
        except OSError as exc:
            replica.state = ReplicaState.EXITED
            logger.error("function %s: cannot run %s: %s", deployment.service, shlex.join(command), exc)
            reason = exc.strerror or type(exc).__name__  # without the gateway machine's paths
            raise ReplicaUnavailable(f"function {deployment.service!r}: cannot run its command: {reason}") from exc
        except BaseException:
            # Failed, timed out or cancelled (scaled down, deleted): leave no process behind.
            await asyncio.shield(replica.stop(self.settings.stop_grace_s))
            raise


def _load_error(response: httpx.Response) -> str:
    """The function's own account of its failure: faasmoe's {"status": "failed", "error": ...}, or the text."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    text = error if isinstance(error, str) else response.text
    return text.strip()[:_LOAD_ERROR_CHARS] or "its ready path answered 500"
