"""The process toolkit: pick a port, start a service, wait until it is healthy, stop it and its descendants.

Every service faasmoe starts as a child (the gateway under `faasmoe up`, servers under tests and
benchmarks) runs in its own session, so a terminal's Ctrl-C reaches only its parent, which stops it
in order, and with the parent-death signal, so that even a parent killed with SIGKILL leaves nothing
running. `ServiceProcess` puts these together as a context manager.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType

import httpx
import psutil

from faasmoe.errors import FaasmoeError
from faasmoe.parent_death import die_with_parent

_POLL_S = 0.05
_LOG_TAIL_LINES = 40
# After the process itself exited, its descendants get this long to follow it (they have the
# parent-death signal, or it stops them) before they are killed.
_FOLLOW_S = 10.0


class ServiceStartError(FaasmoeError):
    """A service process exited, or did not answer its health path in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now, for a program that binds it itself (another may take it first:
    where the program can take a socket, hand it ``listening_socket()`` instead)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def listening_socket(host: str = "127.0.0.1", backlog: int = 2048) -> socket.socket:
    """A TCP socket listening on a port the OS picks. Handed to a child (its fd inherited), the port is the
    child's from the first moment: nothing can take it between choosing and binding, as with free_port.
    Connections that arrive before the child accepts wait in the backlog."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def exit_on_sigterm() -> None:
    """SIGTERM (systemd, Docker, Kubernetes, `kill`) ends this process as a normal exit (code 0).

    Python's default is to die on the spot, so ``finally`` blocks and context managers never run and
    the services this process started are left behind. uvicorn keeps the handler: it catches SIGTERM
    for its graceful shutdown (in-flight requests drain), then re-raises it to the handler found.
    Call from the main thread of a command that runs until it is stopped.
    """
    signal.signal(signal.SIGTERM, _exit_normally)


def _exit_normally(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise SystemExit(0)


def spawn(command: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session, its output appended to ``log_path``, stdin closed.

    Started from the main thread it gets the parent-death signal (SIGTERM). Linux binds that signal to
    the thread that forks, not the process, so a child started from another thread, which may end
    first, goes without it: start services from the main thread and wait for them anywhere.
    """
    on_main_thread = threading.current_thread() is threading.main_thread()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent if on_main_thread and sys.platform == "linux" else None,
        )


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = _POLL_S) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
    return True


def answers_200(url: str, timeout_s: float = 1.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout_s, trust_env=False).status_code == httpx.codes.OK
    except httpx.HTTPError:
        return False


def stop_tree(process: subprocess.Popen[bytes], timeout_s: float) -> list[psutil.Process]:
    """SIGTERM ``process`` (SIGKILL after ``timeout_s``), then wait for its descendants to follow.

    Returns the descendants still running ``_FOLLOW_S`` after the process exited, which it then
    killed: an empty list means the process shut down cleanly, children included.
    """
    descendants = descendants_of(process.pid)
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    wait_until(lambda: not any(running(p) for p in descendants), _FOLLOW_S)
    leftovers = [p for p in descendants if running(p)]
    for orphan in leftovers:
        try:
            orphan.kill()
        except psutil.NoSuchProcess:
            pass
    return leftovers


def signal_group(pid: int, signum: int) -> None:
    """Send ``signum`` to the process group of ``pid``, a process started in its own session (helpers included)."""
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def descendants_of(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def running(process: psutil.Process) -> bool:
    """Alive and not a zombie (a zombie is dead, only not yet reaped)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log ("" if it cannot be read)."""
    try:
        with path.open("rb") as log:
            return b"".join(deque(log, maxlen=lines)).decode(errors="replace")
    except OSError:
        return ""


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
        self.spawn()
        self.wait_healthy()

    def spawn(self) -> None:
        """Start the process without waiting for it (from the main thread: see `spawn`)."""
        self.process = spawn(self.command(), self.log_path, self.env)

    def wait_healthy(self) -> None:
        """Return once the health path answers 200; stop the process and raise ServiceStartError otherwise."""
        process = self.process
        assert process is not None, f"{self.name} not started"
        deadline = time.monotonic() + self.startup_timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            if answers_200(self.url + self.health_path):
                return
            time.sleep(_POLL_S)
        exited = process.poll() is not None
        self.stop()
        if exited:
            raise ServiceStartError(f"{self.name} exited with code {process.returncode}:\n{self.log_tail()}")
        raise ServiceStartError(f"{self.name} not healthy within {self.startup_timeout_s:g} s:\n{self.log_tail()}")

    def descendants(self) -> list[psutil.Process]:
        return descendants_of(self.pid)

    def stop(self) -> list[psutil.Process]:
        """Stop the process and its descendants (see `stop_tree`); returns those that had to be killed."""
        if self.process is None:
            return []
        return stop_tree(self.process, self.stop_timeout_s)

    def log_tail(self) -> str:
        return log_tail(self.log_path)

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
