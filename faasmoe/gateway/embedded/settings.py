"""Typed settings of the embedded gateway (also read from FAASMOE_GATEWAY_* variables)."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from faasmoe.gateway.embedded.errors import InsecureBindError
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
    default_min_replicas: int = Field(default=0, ge=0)
    default_max_replicas: int = Field(default=20, ge=1)

    # Function processes.
    function_command: list[str] = Field(default_factory=default_function_command, min_length=1)
    function_spawn: FunctionSpawn = "fork"
    function_host: str = Field(default="127.0.0.1", description="where replicas listen")
    ready_path: str = Field(default="/ready", description="unless com.openfaas.ready.http.path says")
    cold_start_timeout_s: float = Field(default=120.0, gt=0, description="spawn until ready")
    ready_poll_interval_s: float = Field(default=0.05, gt=0)
    ready_probe_timeout_s: float = Field(default=1.0, gt=0)
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
    namespace: str = "openfaas-fn"

    # Forwarding to replicas.
    upstream_timeout_s: float = Field(default=300.0, gt=0)
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_max_connections: int = Field(default=256, ge=1)
    upstream_max_keepalive: int = Field(default=64, ge=0)
    # A refused connection means the request never reached the function: safe to resend.
    upstream_connect_retries: int = Field(default=1, ge=0)
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
