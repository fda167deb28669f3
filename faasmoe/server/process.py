"""`faasmoe serve` as a child process, ready once /ready answers (for tests, benchmarks and tools)."""

from __future__ import annotations

import sys

from faasmoe.process import ServiceProcess

# Loading the model (imports, trunk weights, tokenizer) takes seconds, more on a busy machine.
SERVE_STARTUP_TIMEOUT_S = 180.0


class ServeProcess(ServiceProcess):
    """``with ServeProcess(args=["--model", ..., "--plan", ..., "--tenants", ...]) as server:``."""

    name = "serve"
    health_path = "/ready"

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("startup_timeout_s", SERVE_STARTUP_TIMEOUT_S)
        super().__init__(**kwargs)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "faasmoe.cli", "serve", "--host", self.host, "--port", str(self.port),
                *self.args]  # fmt: skip
