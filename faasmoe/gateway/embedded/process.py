"""The embedded gateway as a child process (``python -m faasmoe.cli gateway``, what ``faasmoe gateway`` runs)."""

from __future__ import annotations

import sys

import psutil

from faasmoe.gateway.embedded.forkserver import ZYGOTE_MODULE
from faasmoe.process import ServiceProcess

CLI_MODULE = "faasmoe.cli"
GATEWAY_SUBCOMMAND = "gateway"


class GatewayProcess(ServiceProcess):
    """``with GatewayProcess(...) as gateway:``; ``gateway.url`` is its base URL; ``args`` are `faasmoe gateway`'s."""

    name = "gateway"
    health_path = "/healthz"

    def command(self) -> list[str]:
        return [sys.executable, "-m", CLI_MODULE, GATEWAY_SUBCOMMAND, "--host", self.host, "--port", str(self.port),
                *self.args]  # fmt: skip

    def function_processes(self) -> list[psutil.Process]:
        """The function replicas the gateway runs: its descendants but the zygote they may be forked from."""
        return [p for p in self.descendants() if not is_zygote(p, self.pid)]


def is_gateway(process: psutil.Process) -> bool:
    """Whether ``process`` is an embedded gateway (started as GatewayProcess does, or as `faasmoe gateway`)."""
    try:
        command = process.cmdline()
    except psutil.Error:
        return False
    for index, part in enumerate(command[:-1]):
        if (part == CLI_MODULE or part.endswith("/faasmoe")) and command[index + 1] == GATEWAY_SUBCOMMAND:
            return True
    return False


def is_zygote(process: psutil.Process, gateway_pid: int) -> bool:
    """Whether ``process`` is the gateway's function runtime (faasmoe.function.zygote), not a replica."""
    # Forked replicas run the zygote's command line too, but are its children, not the gateway's.
    try:
        return process.ppid() == gateway_pid and ZYGOTE_MODULE in process.cmdline()
    except psutil.NoSuchProcess:
        return False
