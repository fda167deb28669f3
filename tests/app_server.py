"""The control plane's real app served by uvicorn on a loopback port, in a thread of the test process.

For tests that inject a fault into the platform (something no request can trigger) and then talk to
the server over real HTTP; everything else uses `faasmoe serve` as a child process (ServeProcess).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import uvicorn
import yaml
from fastapi import FastAPI

from faasmoe.process import free_port, wait_until
from faasmoe.server.api import create_app
from faasmoe.server.platform import Platform
from faasmoe.server.settings import ServeSettings

STARTUP_TIMEOUT_S = 30.0


def in_process_platform(model: Path, plan: Path, tenants: dict, work: Path, **settings) -> Platform:
    """A platform computing the experts in-process (no gateway)."""
    path = work / "tenants.yaml"
    path.write_text(yaml.safe_dump(tenants))
    return Platform.load(ServeSettings(model=model, plan=plan, tenants=path, **settings))


@contextmanager
def serving(settings: ServeSettings) -> Iterator[tuple[Platform, AppServer]]:
    """What `faasmoe serve` runs, served from this process (it starts in a second, not a new interpreter's 20)."""
    platform = Platform.load(settings)
    try:
        with AppServer(create_app(platform)) as server:
            yield platform, server
    finally:
        platform.stop()


class AppServer:
    """``with AppServer(create_app(platform)) as server:`` serves at ``server.url`` until the block ends."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port("127.0.0.1")
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="app-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> AppServer:
        self.thread.start()
        if not wait_until(lambda: self.server.started or not self.thread.is_alive(), STARTUP_TIMEOUT_S):
            self.__exit__(None, None, None)
            raise RuntimeError("the app server did not start")
        if not self.server.started:
            raise RuntimeError("the app server failed to start")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.server.should_exit = True
        self.thread.join(STARTUP_TIMEOUT_S)
