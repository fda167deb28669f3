"""The embedded gateway as a child process (``python -m faasmoe.gateway.embedded``)."""

from __future__ import annotations

import sys

import psutil

from faasmoe.gateway.embedded.forkserver import ZYGOTE_MODULE
from faasmoe.process import ServiceProcess

GATEWAY_MODULE = "faasmoe.gateway.embedded"


class GatewayProcess(ServiceProcess):
    """``with GatewayProcess(...) as gateway:``; ``gateway.url`` is its base URL."""

    name = "gateway"
    health_path = "/healthz"

    def command(self) -> list[str]:
        return [sys.executable, "-m", GATEWAY_MODULE, "--host", self.host, "--port", str(self.port),
                *self.args]  # fmt: skip

    def function_processes(self) -> list[psutil.Process]:
        """The function replicas the gateway runs: its descendants but the zygote they may be forked from."""
        return [p for p in self.descendants() if not is_zygote(p, self.pid)]


def is_zygote(process: psutil.Process, gateway_pid: int) -> bool:
    """Whether ``process`` is the gateway's function runtime (faasmoe.function.zygote), not a replica."""
    # Forked replicas run the zygote's command line too, but are its children, not the gateway's.
    try:
        return process.ppid() == gateway_pid and ZYGOTE_MODULE in process.cmdline()
    except psutil.NoSuchProcess:
        return False
