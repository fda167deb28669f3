"""Typed settings of the control plane (`faasmoe serve`), also read from FAASMOE_SERVE_* variables.

On Kubernetes the Deployment sets these variables (deploy/control-plane.yaml); on one machine the CLI
flags do. The gateway's credentials come from FAASMOE_SERVE_GATEWAY_BASIC_AUTH (USER:PASSWORD).
"""

from __future__ import annotations

import enum
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from faasmoe.server.scheduler import SchedulerSettings

DEFAULT_PORT = 8000


class Mode(str, enum.Enum):
    """The FaaSMoE design's orchestrator modes."""

    SHARED = "shared"  # one control plane (trunk + scheduler) for every tenant
    PRIVATE = "private"  # one control plane per tenant, all over the same function pool


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FAASMOE_SERVE_", env_nested_delimiter="__", extra="ignore")

    model: Path = Field(description="the Hugging Face checkpoint directory (config, tokenizer)")
    plan: Path = Field(description="the plan directory written by `faasmoe export`")
    tenants: Path = Field(description="the tenants file (YAML)")
    gateway: str | None = Field(None, description="OpenFaaS gateway URL; None computes the experts in-process")
    gateway_basic_auth: SecretStr | None = Field(None, description="USER:PASSWORD for the gateway's /system/*")
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    mode: Mode = Mode.SHARED
    served_model_name: str | None = Field(None, description="the id in /v1/models; None: the model folder's name")
    default_max_tokens: int = Field(256, ge=1, description="chat completions without max_tokens")
    max_prompt_tokens: int | None = Field(None, ge=1, description="None: the model's context length")
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None keeps torch's default")
    log_level: str = "info"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.resolve().name
