"""Command-line options of the embedded gateway, turned into settings (shared by CLI and __main__)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from faasmoe.gateway.client import parse_basic_auth
from faasmoe.gateway.embedded.settings import EmbeddedGatewaySettings


def settings_from_options(
    host: str | None = None,
    port: int | None = None,
    idle_timeout: float | None = None,
    basic_auth: str | None = None,
    *,
    cold_start_timeout: float | None = None,
    function_command: str | None = None,
    function_spawn: str | None = None,
    log_dir: Path | None = None,
    reaper_interval: float | None = None,
    scale_to_zero: bool | None = None,
    log_level: str | None = None,
) -> EmbeddedGatewaySettings:
    """Settings from command-line style options; an option left None keeps the env/default value.

    ``basic_auth`` is USER:PASSWORD; ``function_command`` is one shell-quoted string.
    """
    given: dict[str, Any] = {
        "host": host,
        "port": port,
        "idle_timeout_s": idle_timeout,
        "cold_start_timeout_s": cold_start_timeout,
        "function_command": shlex.split(function_command) if function_command else None,
        "function_spawn": function_spawn,
        "log_dir": log_dir,
        "reaper_interval_s": reaper_interval,
        "scale_to_zero_default": scale_to_zero,
        "log_level": log_level,
    }
    if basic_auth is not None:
        user, password = parse_basic_auth(basic_auth)
        given["basic_auth_user"] = user
        given["basic_auth_password"] = SecretStr(password)
    return EmbeddedGatewaySettings(**{key: value for key, value in given.items() if value is not None})
