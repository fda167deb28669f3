"""What a function process runs with: its command and a minimal, explicit environment.

A deployment may name a command (envProcess) and environment variables (envVars). Both can run code:
envProcess directly, envVars through the loader and the interpreter (LD_PRELOAD, PYTHONPATH,
PYTHONWARNINGS, BROWSER, ...). So envProcess needs the operator's ``allow_env_process`` (which needs
credentials), and without it envVars are limited to names the function server reads.

A replica's environment is built, never inherited whole: a passthrough list of the gateway's own
variables (never FAASMOE_GATEWAY_*: credentials), the deployment's envVars, and the listen address.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
from collections.abc import Iterable, Mapping

from faasmoe.errors import BadRequest
from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings
from faasmoe.gateway.schemas import FunctionDeployment

# envVars any deployment may set: faasmoe's function settings and the math libraries' thread counts.
SAFE_ENV_VARS = ("FAASMOE_*", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY")
# The gateway's own settings, its credentials among them, never reach a function.
GATEWAY_PREFIX = "FAASMOE_GATEWAY_"
# POSIX environment names; anything else cannot be set (or is read differently by different programs).
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def inherited(settings: EmbeddedGatewaySettings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The gateway's variables a function process inherits (the zygote's whole environment)."""
    environ = os.environ if environ is None else environ
    return {
        name: value
        for name, value in environ.items()
        if matches(name, settings.env_passthrough) and not name.startswith(GATEWAY_PREFIX)
    }


def replica_environment(
    settings: EmbeddedGatewaySettings, deployment: FunctionDeployment, host: str, port: int
) -> dict[str, str]:
    """Inherited variables, then the deployment's envVars; the listen address is the gateway's to choose."""
    return {**inherited(settings), **deployment.env_vars, "FAASMOE_HOST": host, "FAASMOE_PORT": str(port)}


def command_of(settings: EmbeddedGatewaySettings, deployment: FunctionDeployment) -> list[str]:
    """OpenFaaS's envProcess (the watchdog's fprocess) names the process to run; else the configured one."""
    if deployment.env_process:
        return shlex.split(deployment.env_process)
    return list(settings.function_command)


def check_runnable(settings: EmbeddedGatewaySettings, deployment: FunctionDeployment) -> None:
    """Raises BadRequest if ``deployment`` asks to run what this gateway does not allow, or cannot pass on."""
    if deployment.env_process and not settings.allow_env_process:
        raise BadRequest(
            f"function {deployment.service!r}: envProcess is disabled on this gateway (it would run a command "
            "of the deployer's choosing); the operator can enable it with --allow-env-process"
        )
    if deployment.env_process:
        try:
            command = shlex.split(deployment.env_process)
        except ValueError as exc:
            raise BadRequest(f"function {deployment.service!r}: envProcess is not a valid command: {exc}") from None
        if not command or any("\0" in part for part in command):
            raise BadRequest(f"function {deployment.service!r}: envProcess must be a non-empty command")
    allowed = (*SAFE_ENV_VARS, *settings.allow_env_vars)
    for name, value in deployment.env_vars.items():
        if not _ENV_NAME.fullmatch(name) or "\0" in value:
            raise BadRequest(f"function {deployment.service!r}: envVars name {name!r} or its value is not valid")
        if not settings.allow_env_process and not matches(name, allowed):
            raise BadRequest(
                f"function {deployment.service!r}: envVars {name!r} is not allowed on this gateway (allowed: "
                f"{', '.join(allowed)}); the operator can allow more with --allow-env-var"
            )
