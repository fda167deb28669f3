"""The embedded gateway as a child process (``python -m faasmoe.gateway.embedded``)."""

from __future__ import annotations

import sys

import psutil

from faasmoe.process import ServiceProcess


class GatewayProcess(ServiceProcess):
    """``with GatewayProcess(...) as gateway:``; ``gateway.url`` is its base URL."""

    name = "gateway"
    health_path = "/healthz"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "faasmoe.gateway.embedded", "--host", self.host, "--port", str(self.port),
                *self.args]  # fmt: skip

    def function_processes(self) -> list[psutil.Process]:
        """The gateway's descendants: the function replicas it runs."""
        return self.descendants()
