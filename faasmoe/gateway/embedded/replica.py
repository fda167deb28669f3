"""One replica: a local OS process of a function server, its readiness and its stopping.

Each failure means one thing: "busy / starting" is the function's own 429/503 (retried by clients);
a function that failed to load (500) or crashed (502) is final, and clients do not retry it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import httpx

from faasmoe.errors import FaasmoeError
from faasmoe.parent_death import die_with_parent
from faasmoe.process import log_tail, signal_group

if TYPE_CHECKING:
    from faasmoe.gateway.embedded.forkserver import ForkedProcess, ForkServer

logger = logging.getLogger(__name__)

# How often a stopping process is checked for exit: short, since memory is freed only then.
_EXIT_POLL_S = 0.05
# How often a starting replica's ready path is probed, and how long one probe may take.
_READY_POLL_S = 0.05
_READY_PROBE_TIMEOUT_S = 1.0
# Log lines quoted in the gateway's log when a replica dies before it is ready.
_LOG_TAIL_LINES = 20
# How much of a function's load error is passed on to the caller.
_LOAD_ERROR_CHARS = 1000


class FunctionFailed(FaasmoeError):
    """The function said it cannot serve: its ready path answered 500, e.g. its shard failed to load (HTTP 500)."""


class ReplicaUnavailable(FaasmoeError):
    """No replica could serve the request: it crashed, timed out or could not be run (HTTP 502)."""


class ReplicaLost(ReplicaUnavailable):
    """A starting replica was killed by a signal, or its runtime (the zygote) went away: not the
    function's fault, so the pool sends the request once more, to a fresh replica."""


class ReplicaState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    EXITED = "exited"


class Replica:
    """A function server process listening on ``host:port`` (the port is known once it is spawned)."""

    def __init__(self, function: str, host: str, log_path: Path) -> None:
        self.function = function
        self.host = host
        self.port: int | None = None
        self.log_path = log_path
        self.state = ReplicaState.STARTING
        self.in_flight = 0
        self.process: asyncio.subprocess.Process | ForkedProcess | None = None
        # Set by the pool: the task that spawns this replica and waits until it is ready.
        self.startup: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def has_exited(self) -> bool:
        """True once the process is gone (the event loop, or the zygote, reaped it)."""
        return self.process is not None and self.process.returncode is not None

    async def exits_within(self, seconds: float) -> bool:
        """True if the process is gone, or goes within ``seconds``."""
        deadline = time.monotonic() + seconds
        while not self.has_exited():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_EXIT_POLL_S)
        return True

    async def spawn(self, command: list[str], env: dict[str, str], port: int, pass_fds: tuple[int, ...] = ()) -> None:
        """Runs ``command`` as a new process listening on ``port`` (on the socket in ``pass_fds``, if given)."""
        self.port = port
        with self.log_path.open("ab") as log:
            self._log_start(log, shlex.join(command))
            self.process = await asyncio.create_subprocess_exec(
                *command,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                # Own process group: the terminal's Ctrl-C reaches only the gateway, which then
                # stops replicas in order; stop() signals the whole group (helpers included).
                start_new_session=True,
                pass_fds=pass_fds,
                # Forked by the event loop's thread, which lives as long as the gateway.
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        logger.info("function %s: replica pid %d starting on port %d", self.function, self.pid, self.port)

    async def fork(self, server: ForkServer, env: dict[str, str]) -> None:
        """Forks the replica from the function runtime's zygote."""
        with self.log_path.open("ab") as log:
            self._log_start(log, "forked from the function runtime")
        self.process = await server.spawn(env, self.log_path)
        self.port = self.process.port
        logger.info("function %s: replica pid %d forked on port %d", self.function, self.pid, self.port)

    def _log_start(self, log: BinaryIO, how: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"--- {stamp} starting replica: {how}\n".encode())
        log.flush()

    async def wait_ready(self, http: httpx.AsyncClient, ready_path: str, timeout_s: float) -> None:
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
                    "function %s: replica log %s ends with:\n%s",
                    self.function,
                    self.log_path,
                    log_tail(self.log_path, _LOG_TAIL_LINES),
                )
                if code is not None and code < 0:
                    raise ReplicaLost(
                        f"function {self.function!r}: replica killed by signal {-code} before it was ready"
                    )
                raise ReplicaUnavailable(
                    f"function {self.function!r}: replica exited with code {code} before it was ready"
                )
            try:
                response = await http.get(self.url + ready_path, timeout=_READY_PROBE_TIMEOUT_S)
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
            await asyncio.sleep(_READY_POLL_S)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; return once the process is gone."""
        self.state = ReplicaState.STOPPING
        if self.process is None:
            self.state = ReplicaState.EXITED
            return
        if not self.has_exited():
            signal_group(self.process.pid, signal.SIGTERM)
        if not await self.exits_within(grace_s):
            logger.warning("function %s: replica pid %d ignored SIGTERM; killing", self.function, self.pid)
            signal_group(self.process.pid, signal.SIGKILL)
            await self.exits_within(float("inf"))
        # Helpers the server left behind in its group die with it.
        signal_group(self.process.pid, signal.SIGKILL)
        self.state = ReplicaState.EXITED
        logger.info("function %s: replica pid %d stopped", self.function, self.pid)


def _load_error(response: httpx.Response) -> str:
    """The function's own account of its failure: faasmoe's {"status": "failed", "error": ...}, or the text."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    text = error if isinstance(error, str) else response.text
    return text.strip()[:_LOAD_ERROR_CHARS] or "its ready path answered 500"
