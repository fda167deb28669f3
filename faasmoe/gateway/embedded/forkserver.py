"""Replicas forked from the function runtime's zygote (faasmoe.function.zygote) instead of exec'd anew.

A forked replica skips the interpreter start and torch's import (about 1.4 s of a 1.5 s cold start on
an idle machine, several seconds on a busy one) and shares the imported runtime's memory with the
other replicas. It still is its own process: it loads its own shard on a cold start, it is stopped
(and its memory returned) on scale to zero, and it answers the same ready path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from faasmoe.gateway.embedded.replica import ReplicaLost, ReplicaUnavailable
from faasmoe.parent_death import die_with_parent

logger = logging.getLogger(__name__)

# What a replica's exit is reported as when its zygote dies first: the kernel sends it SIGTERM then
# (its parent-death signal), and nobody is left to report its real exit.
_ORPHANED = -signal.SIGTERM
ZYGOTE_MODULE = "faasmoe.function.zygote"
_ZYGOTE_EXITED = "the function runtime (zygote) exited"


class ForkedProcess:
    """A replica forked by the zygote: ``pid`` and ``returncode`` as replicas read them, and the blocking
    poll/wait/terminate of subprocess.Popen for synchronous callers (benchmarks/function_bench.py)."""

    def __init__(self, pid: int, port: int) -> None:
        self.pid = pid
        self.port = port  # the zygote bound the replica's socket before forking it
        self.returncode: int | None = None
        self._exited = threading.Event()  # wait() is called from worker threads

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        self._exited.wait(timeout)
        return self.returncode

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)

    def exited(self, returncode: int) -> None:
        self.returncode = returncode
        self._exited.set()


class ForkServer:
    """The zygote process and its bookkeeping: spawn requests in order, exits as they are reported."""

    def __init__(self, log_path: Path, startup_timeout_s: float, env: dict[str, str]) -> None:
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        # The zygote's whole environment: replicas forked from it show it as theirs in /proc/PID/environ.
        self.env = env
        self._process: asyncio.subprocess.Process | None = None
        self._started: asyncio.Task[None] | None = None
        self._replies: asyncio.Queue[dict] = asyncio.Queue()
        self._children: dict[int, ForkedProcess] = {}
        self._lock = asyncio.Lock()  # one request and its reply at a time
        self._reader: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        """Starts the zygote in the background (call inside the event loop); spawn() waits for it."""
        if self._started is None or (self._started.done() and not self.alive):
            self._started = asyncio.create_task(self._start())

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None and self._reader is not None

    async def spawn(self, env: dict[str, str], log_path: Path) -> ForkedProcess:
        """Forks a replica, listening on a port the zygote chose (``port``); raises ReplicaUnavailable if it cannot."""
        self.start()
        assert self._started is not None
        try:
            await asyncio.shield(self._started)
        except Exception as exc:
            self._started = None  # the next spawn tries again
            logger.error("the function runtime did not start: %r; see %s", exc, self.log_path)
            raise ReplicaUnavailable("the function runtime did not start") from exc
        # Once asked, the zygote forks and answers, in order. A caller cancelled meanwhile (its replica scaled
        # down while starting) must not leave that answer unread: the next spawn would take it for its own
        # and route its function's calls to this replica. So the exchange runs on, and stops what it forked.
        exchange = asyncio.ensure_future(self._exchange({"env": env, "log": str(log_path)}))
        try:
            reply = await asyncio.shield(exchange)
        except asyncio.CancelledError:
            exchange.add_done_callback(_stop_unclaimed)
            raise
        if reply.get("error") == _ZYGOTE_EXITED:
            raise ReplicaLost(f"the function runtime could not fork a replica: {_ZYGOTE_EXITED}")
        if "spawned" not in reply:
            raise ReplicaUnavailable(f"the function runtime could not fork a replica: {reply.get('error', reply)}")
        child = ForkedProcess(reply["spawned"], reply["port"])
        self._children[child.pid] = child
        return child

    async def _exchange(self, request: dict) -> dict:
        """One request and its reply, with no other in between."""
        async with self._lock:
            assert self._process is not None and self._process.stdin is not None
            self._process.stdin.write(json.dumps(request).encode() + b"\n")
            await self._process.stdin.drain()
            return await self._replies.get()

    async def close(self) -> None:
        """Closes the zygote's input, so it exits; call after every replica has been stopped."""
        if self._started is not None and not self._started.done():
            self._started.cancel()
        process = self._process
        if process is None:
            return
        self._closing = True
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), timeout=5.0)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
        if self._reader is not None:
            await self._reader

    async def _start(self) -> None:
        self._replies = asyncio.Queue()  # nothing a previous zygote said is an answer now
        command = [sys.executable, "-m", ZYGOTE_MODULE]
        with self.log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches the gateway only, which stops replicas in order
                preexec_fn=die_with_parent,
            )
        assert self._process.stdout is not None
        try:
            line = await asyncio.wait_for(self._process.stdout.readline(), timeout=self.startup_timeout_s)
        except asyncio.TimeoutError:
            self._process.kill()
            raise
        if json.loads(line or b"{}").get("ready") is not True:
            raise RuntimeError(f"the zygote exited with code {await self._process.wait()} while importing")
        self._reader = asyncio.create_task(self._read())
        logger.info("function runtime (zygote) pid %d ready", self._process.pid)

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        while line := await self._process.stdout.readline():
            message = json.loads(line)
            if "exited" in message:
                child = self._children.pop(message["exited"], None)
                if child is not None:
                    child.exited(message["returncode"])
            else:
                await self._replies.put(message)
        # The zygote is gone: its replicas were sent SIGTERM by the kernel; a spawn waiting for a reply fails.
        for child in self._children.values():
            child.exited(_ORPHANED)
        self._children.clear()
        await self._replies.put({"error": _ZYGOTE_EXITED})
        self._reader = None
        with contextlib.suppress(ProcessLookupError):
            await self._process.wait()
        level = logging.INFO if self._closing else logging.WARNING
        logger.log(level, "function runtime (zygote) exited with code %s", self._process.returncode)


def _stop_unclaimed(exchange: asyncio.Future[dict]) -> None:
    """The replica forked for a caller that went away: nobody will serve on it or stop it, so stop it now."""
    if exchange.cancelled() or exchange.exception() is not None:
        return
    pid = exchange.result().get("spawned")
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
