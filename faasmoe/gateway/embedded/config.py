"""What the embedded gateway is told: its settings, each function's scale policy, and what a function may run.

Settings are typed once here (also read from FAASMOE_GATEWAY_* variables). A function's scaling and
readiness come from its OpenFaaS labels and annotations (``ScalePolicy``).

A deployment may name a command (envProcess) and environment variables (envVars). Both can run code:
envProcess directly, envVars through the loader and the interpreter (LD_PRELOAD, PYTHONPATH,
PYTHONWARNINGS, BROWSER, ...). So envProcess needs the operator's ``allow_env_process`` (which needs
credentials), and without it envVars are limited to names the function server reads.

A replica's environment is built, never inherited whole: a passthrough list of the gateway's own
variables (never FAASMOE_GATEWAY_*: credentials), the deployment's envVars, and the listen address.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from faasmoe.errors import BadRequest, FaasmoeError
from faasmoe.gateway.durations import DurationError, parse_positive_duration
from faasmoe.gateway.schemas import (
    ANNOTATION_READY_PATH,
    DEFAULT_SCALE_MAX,
    LABEL_SCALE_MAX,
    LABEL_SCALE_MIN,
    LABEL_SCALE_ZERO,
    LABEL_SCALE_ZERO_DURATION,
    FunctionDeployment,
)
from faasmoe.request_body import MIB

# fork: faasmoe's function server is forked from a zygote that imported it once (fast, shared memory;
# Linux only); exec: every replica starts a new interpreter, as a container would.
FunctionSpawn = Literal["fork", "exec"]


# What a replica (and the zygote it may be forked from) inherits from the gateway's environment: what
# Python and its libraries need to run, nothing of the gateway's own configuration (credentials included).
DEFAULT_ENV_PASSTHROUGH = (
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_*",
    "TZ",
    "TMPDIR",
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)
# A 4096-token prefill of Qwen1.5-MoE (hidden 2048) in fp32 is 32 MiB of hidden states: twice that.
DEFAULT_MAX_BODY_BYTES = 64 * MIB
# The only namespace of this gateway (OpenFaaS's default one).
NAMESPACE = "openfaas-fn"


class InsecureBindError(FaasmoeError):
    """The gateway was asked to run insecurely: an open /system/* beyond loopback, or envProcess without auth."""


def default_function_command() -> list[str]:
    """The faasmoe function server, run by the gateway's own interpreter."""
    return [sys.executable, "-m", "faasmoe.function"]


class EmbeddedGatewaySettings(BaseSettings):
    """Everything the embedded gateway can be told; the defaults suit one developer machine."""

    model_config = SettingsConfigDict(env_prefix="FAASMOE_GATEWAY_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    basic_auth_user: str | None = None
    basic_auth_password: SecretStr | None = None
    # envProcess runs a command of the deployer's choosing (and any envVars): only for trusted deployers.
    allow_env_process: bool = Field(default=False, description="run a deployment's envProcess; needs basic auth")

    # Scaling defaults, overridden per function by com.openfaas.scale.* labels.
    idle_timeout_s: float = Field(default=300.0, gt=0, description="idle time before scale to zero")
    scale_to_zero_default: bool = Field(default=True, description="for functions without scale.zero")

    # Function processes.
    function_command: list[str] = Field(default_factory=default_function_command, min_length=1)
    function_spawn: FunctionSpawn = "fork"
    ready_path: str = Field(default="/ready", description="unless com.openfaas.ready.http.path says")
    cold_start_timeout_s: float = Field(default=120.0, gt=0, description="spawn until ready")
    stop_grace_s: float = Field(default=10.0, ge=0, description="SIGTERM until SIGKILL")
    log_dir: Path | None = Field(default=None, description="function logs; None: a new temp dir")
    env_passthrough: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ENV_PASSTHROUGH),
        description="names (fnmatch patterns) of the gateway's variables that functions inherit",
    )
    allow_env_vars: list[str] = Field(
        default_factory=list,
        description="envVars names (fnmatch patterns) deployments may set beyond FAASMOE_* and thread counts",
    )
    # A replica that failed to start (its shard did not load, it crashed, it timed out) is not started
    # again for every request: requests meanwhile get the same failure at once. An update clears it.
    start_failure_cooldown_s: float = Field(default=10.0, ge=0, description="how long a start failure is final")
    reaper_interval_s: float = Field(default=1.0, gt=0, description="how often idleness is checked")
    direct_replicas: bool = Field(
        default=True, description="name the serving replica in invocation answers, for callers to call it directly"
    )

    upstream_timeout_s: float = Field(default=300.0, gt=0, description="how long an invocation may take")
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1, description="larger invocations get 413")

    shutdown_grace_s: float = Field(default=5.0, ge=0, description="for in-flight requests")
    log_level: str = "info"

    @property
    def auth_enabled(self) -> bool:
        return self.basic_auth_user is not None and self.basic_auth_password is not None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ensure_safe_binding(settings: EmbeddedGatewaySettings) -> None:
    """Without credentials /system/* lets anyone deploy: allow that on loopback only, and never with envProcess."""
    if settings.auth_enabled:
        return
    if settings.allow_env_process:
        raise InsecureBindError(
            "refusing --allow-env-process without basic auth: anyone who can reach /system/* could run any "
            "command. Set credentials (--basic-auth USER:PASSWORD or FAASMOE_GATEWAY_BASIC_AUTH_USER/_PASSWORD)."
        )
    if is_loopback(settings.host):
        return
    raise InsecureBindError(
        f"refusing to listen on {settings.host!r} without basic auth: /system/* would let anyone "
        "on the network deploy functions. Bind to 127.0.0.1, or set credentials "
        "(--basic-auth USER:PASSWORD or FAASMOE_GATEWAY_BASIC_AUTH_USER/_PASSWORD)."
    )


# --- a function's scale policy ----------------------------------------------------------------

# An absolute path with an optional query, of RFC 3986's characters: probed on the replica's own address.
_READY_PATH = re.compile(r"/?[A-Za-z0-9._~!$&'()*+,;=:@%/-]*(\?[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*)?")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


@dataclass(frozen=True)
class ScalePolicy:
    """A function's scaling and readiness policy, read from its OpenFaaS labels and annotations."""

    min_replicas: int
    max_replicas: int
    scale_to_zero: bool
    idle_timeout_s: float
    ready_path: str

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))

    @classmethod
    def for_deployment(cls, deployment: FunctionDeployment, settings: EmbeddedGatewaySettings) -> ScalePolicy:
        """The policy of ``deployment``; a malformed label is a BadRequest naming it."""
        labels = deployment.labels
        min_replicas = _int_label(labels, LABEL_SCALE_MIN, 0)
        max_replicas = _int_label(labels, LABEL_SCALE_MAX, DEFAULT_SCALE_MAX)
        if max_replicas < 1 or min_replicas > max_replicas:
            raise BadRequest(
                f"function {deployment.service!r}: need 0 <= {LABEL_SCALE_MIN} <= {LABEL_SCALE_MAX} "
                f"and {LABEL_SCALE_MAX} >= 1, got min={min_replicas} max={max_replicas}"
            )
        ready_path = deployment.annotations.get(ANNOTATION_READY_PATH, settings.ready_path)
        if not _READY_PATH.fullmatch(ready_path):
            raise BadRequest(f"annotation {ANNOTATION_READY_PATH}={ready_path!r} is not a URL path")
        return cls(
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            scale_to_zero=_bool_label(labels, LABEL_SCALE_ZERO, settings.scale_to_zero_default),
            idle_timeout_s=_duration_label(labels, LABEL_SCALE_ZERO_DURATION, settings.idle_timeout_s),
            ready_path=ready_path if ready_path.startswith("/") else "/" + ready_path,
        )


def _int_label(labels: dict[str, str], key: str, default: int) -> int:
    if key not in labels:
        return default
    try:
        value = int(labels[key])
    except ValueError:
        raise BadRequest(f"label {key}={labels[key]!r} is not a whole number") from None
    if value < 0:
        raise BadRequest(f"label {key}={labels[key]!r} must not be negative")
    return value


def _bool_label(labels: dict[str, str], key: str, default: bool) -> bool:
    if key not in labels:
        return default
    value = labels[key].strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadRequest(f'label {key}={labels[key]!r} must be "true" or "false"')


def _duration_label(labels: dict[str, str], key: str, default_s: float) -> float:
    if key not in labels:
        return default_s
    try:
        return parse_positive_duration(labels[key])
    except DurationError as exc:
        raise BadRequest(f"label {key}: {exc}") from None


# --- what a function process runs with ----------------------------------------------------------

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


def replica_environment(settings: EmbeddedGatewaySettings, deployment: FunctionDeployment, host: str) -> dict[str, str]:
    """Inherited variables, then the deployment's envVars; the listen address (FAASMOE_HOST, and FAASMOE_PORT
    once the replica's port is chosen) is the gateway's to choose."""
    return {**inherited(settings), **deployment.env_vars, "FAASMOE_HOST": host}


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
