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

from faasmoe.gateway.embedded.errors import ReplicaUnavailable
from faasmoe.gateway.embedded.forkserver import ForkedProcess, ForkServer
from faasmoe.gateway.embedded.ports import free_port
from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings, default_function_command
from faasmoe.gateway.schemas import FunctionDeployment
from faasmoe.parent_death import die_with_parent

logger = logging.getLogger(__name__)

# How often a stopping process is checked for exit: short, since memory is freed only then.
_EXIT_POLL_S = 0.05
# Log lines quoted in the error when a replica dies before it is ready.
_LOG_TAIL_LINES = 20


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
        """Poll ``ready_path`` until it answers 200; raise ReplicaUnavailable if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.has_exited():
                assert self.process is not None
                # The log tail goes to the gateway's log only: /function/* callers are not
                # authenticated, and a function's output may hold what they must not see.
                logger.warning("function %s: replica log ends with:\n%s", self.function, self.log_tail())
                raise ReplicaUnavailable(
                    f"function {self.function!r}: replica exited with code {self.process.returncode} "
                    f"before it was ready; see {self.log_path}"
                )
            try:
                response = await http.get(self.url + ready_path, timeout=probe_timeout_s)
                if response.status_code == httpx.codes.OK:
                    self.state = ReplicaState.READY
                    logger.info("function %s: replica pid %d ready", self.function, self.pid)
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() >= deadline:
                raise ReplicaUnavailable(
                    f"function {self.function!r}: replica not ready at {ready_path} within {timeout_s:g} s "
                    f"(the cold-start timeout); log {self.log_path}"
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

    def command(self, deployment: FunctionDeployment) -> list[str]:
        # OpenFaaS's envProcess (the watchdog's fprocess) names the process to run; else the default.
        if deployment.env_process:
            return shlex.split(deployment.env_process)
        return list(self.settings.function_command)

    def forkserver_for(self, deployment: FunctionDeployment) -> ForkServer | None:
        """The zygote that forks this function's replicas: faasmoe's function server only, and only in fork mode."""
        default = not deployment.env_process and self.settings.function_command == default_function_command()
        return self.forkserver if default else None

    def prepare(self, deployment: FunctionDeployment) -> None:
        """On deploy: start the zygote now if this function forks, so its first cold start need not import."""
        if (forkserver := self.forkserver_for(deployment)) is not None:
            forkserver.start()

    def environment(self, deployment: FunctionDeployment, replica: Replica) -> dict[str, str]:
        # The gateway's environment is inherited (PATH, PYTHONPATH, CUDA_*); the deployment's
        # envVars override it, and the listen address is the gateway's to choose.
        return {
            **os.environ,
            **deployment.env_vars,
            "FAASMOE_HOST": replica.host,
            "FAASMOE_PORT": str(replica.port),
        }

    async def start(self, replica: Replica, deployment: FunctionDeployment, ready_path: str) -> None:
        """Spawn ``replica`` and wait until it is ready; on failure its process is stopped."""
        try:
            environment = self.environment(deployment, replica)
            if (forkserver := self.forkserver_for(deployment)) is not None:
                await replica.fork(forkserver, environment)
            else:
                replica.spawn(self.command(deployment), environment)
            await replica.wait_ready(
                self.http,
                ready_path,
                self.settings.cold_start_timeout_s,
                poll_interval_s=self.settings.ready_poll_interval_s,
                probe_timeout_s=self.settings.ready_probe_timeout_s,
            )
        except OSError as exc:
            replica.state = ReplicaState.EXITED
            raise ReplicaUnavailable(
                f"function {deployment.service!r}: cannot run {shlex.join(self.command(deployment))}: {exc}"
            ) from exc
        except BaseException:
            # Failed, timed out or cancelled (scaled down, deleted): leave no process behind.
            await asyncio.shield(replica.stop(self.settings.stop_grace_s))
            raise
