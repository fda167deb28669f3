"""A faasmoe service (gateway, control plane) as a child process that is always stopped, descendants too.

For tests, benchmarks and tools that need a real server on a real port and must never leave it, or
the processes it started, running behind them.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx
import psutil

from faasmoe.errors import FaasmoeError
from faasmoe.gateway.embedded.ports import free_port

_HEALTH_POLL_S = 0.05
_LOG_TAIL_CHARS = 4000


class ServiceStartError(FaasmoeError):
    """A service process exited, or did not answer its health path in time."""


class ServiceProcess:
    """Start with ``with Subclass(...) as service:``; ``service.url`` is its base URL.

    Subclasses say what to run (``command()``) and which path answers 200 once it serves (``health_path``).
    """

    name = "service"
    health_path = "/health"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        startup_timeout_s: float = 30.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.args = list(args)
        self.env = env
        self.log_path = log_path or _new_log_file(self.name)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} not started"
        return self.process.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        """Start the process and return once its health path answers 200; raise ServiceStartError otherwise."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceStartError(f"{self.name} exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.health_path, timeout=1.0, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(_HEALTH_POLL_S)
        self.stop()
        raise ServiceStartError(f"{self.name} not healthy within {self.startup_timeout_s:g} s:\n{self.log_tail()}")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> list[psutil.Process]:
        """SIGTERM the process (which stops its own children), SIGKILL on timeout.

        Returns the descendants it left running, which this method then killed: an empty list means
        the process shut down cleanly.
        """
        if self.process is None:
            return []
        descendants = self.descendants()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        leftovers = [p for p in descendants if _running(p)]
        for orphan in leftovers:
            try:
                orphan.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=self.stop_timeout_s)
        return leftovers

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def __enter__(self):  # -> Self
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _new_log_file(name: str) -> Path:
    descriptor, path = tempfile.mkstemp(prefix=f"faasmoe-{name}-", suffix=".log")
    os.close(descriptor)
    return Path(path)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
