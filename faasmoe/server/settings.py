"""Typed settings of the control plane (`faasmoe serve`), also read from FAASMOE_SERVE_* variables.

On Kubernetes the Deployment sets these variables (deploy/control-plane.yaml); on one machine the CLI
flags do. The gateway's credentials come from FAASMOE_SERVE_GATEWAY_BASIC_AUTH (USER:PASSWORD), the key
that opens /metrics from FAASMOE_SERVE_METRICS_KEY.
"""

from __future__ import annotations

import enum
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from faasmoe.elastic.hot_replicas import HotReplicaSettings
from faasmoe.elastic.keep_alive import KeepAliveMode, KeepAliveSettings
from faasmoe.elastic.predictor import PredictorSettings
from faasmoe.elastic.prewarm import PrewarmMode
from faasmoe.elastic.routing_profile import DEFAULT_INTERVAL_S
from faasmoe.elastic.routing_stats import DEFAULT_HALF_LIFE_S
from faasmoe.planning.stack import StackSettings
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
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="request bodies over this get 413")
    metrics_key: SecretStr | None = Field(None, min_length=8, description="Bearer key opening /metrics; None: off")
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None keeps torch's default")
    micro_batches: int = Field(
        1, ge=1, le=4, description="2: one half's routed experts in flight while the other half computes (Trunk.step)"
    )
    log_level: str = "info"
    shutdown_grace_s: float = Field(10.0, ge=0, description="on SIGTERM/SIGINT, for in-flight requests to finish")
    # Reconciliation: the control plane keeps the gateway's functions as its plan says (server/reconciler.py).
    reconcile: bool = Field(False, description="deploy the plan's missing functions and update changed ones")
    reconcile_interval_s: float = Field(5.0, gt=0, description="seconds between comparisons with the gateway")
    functions: StackSettings = Field(default_factory=StackSettings, description="what reconciliation deploys")
    # Routing statistics (elastic/routing_stats.py), persisted as the routing profile (docs/elasticity.md).
    routing_half_life_s: float = Field(DEFAULT_HALF_LIFE_S, gt=0, description="decay of the routing statistics")
    routing_profile: Path | None = Field(None, description="JSON file loaded at start, written back; None: off")
    routing_profile_interval_s: float = Field(DEFAULT_INTERVAL_S, gt=0, description="seconds between its writes")
    predictor: PredictorSettings = Field(default_factory=PredictorSettings, description="the popularity predictor")
    # Prewarm (elastic/prewarm.py): at admission, wake the functions a request will need, all layers at once.
    prewarm: PrewarmMode = Field(PrewarmMode.PREDICTED, description="off, all, or predicted; no-op without a gateway")
    prewarm_threshold: float = Field(0.05, gt=0, le=1, description="predicted: wake functions at least this likely")
    prewarm_concurrency: int = Field(16, ge=1, description="prewarm calls in flight to the gateway at most")
    # Keep-alive (elastic/idler.py): scale a function to zero once idle for its own keep-alive, at most its label's.
    keep_alive: KeepAliveMode = Field(KeepAliveMode.ADAPTIVE, description="fixed or adaptive; no-op without a gateway")
    keep_alive_policy: KeepAliveSettings = Field(default_factory=KeepAliveSettings, description="adaptive's knobs")
    # Hot replicas (elastic/hot_replicas.py): more replicas for a function whose calls queue, its rows split over them.
    hot_replicas: HotReplicaSettings = Field(default_factory=HotReplicaSettings, description="no-op without a gateway")

    @model_validator(mode="after")
    def _functions_as_deploy_would(self) -> ServeSettings:
        if self.reconcile and self.gateway is None:
            raise ValueError("reconcile needs a gateway to deploy the functions to")
        # As `faasmoe deploy`: functions read the plan where this control plane does, and exactness
        # needs the trunk's thread count in every function.
        given = self.functions.model_fields_set
        defaults = {"weights_uri": str(self.plan.resolve()), "threads": self.threads}
        update = {key: value for key, value in defaults.items() if key not in given and value is not None}
        self.functions = self.functions.model_copy(update=update)
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.resolve().name
