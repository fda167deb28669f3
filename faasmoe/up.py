"""`faasmoe up`: the whole platform on one machine, in one command.

embedded gateway (functions as local processes) -> plan exported -> control plane serving the tenants,
which deploys the plan's functions and keeps them deployed (server/reconciler.py). The gateway's
/system API gets generated credentials, which only the control plane is told. Ctrl-C or SIGTERM
stops the control plane, then the gateway and every function process.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel, Field
from rich.console import Console

from faasmoe.command import given
from faasmoe.elastic.hot_replicas import QueueTarget
from faasmoe.elastic.keep_alive import KeepAliveMode
from faasmoe.elastic.prewarm import PrewarmMode
from faasmoe.gateway.durations import PositiveDuration
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.model.init_model import InitModelOptions, init_model
from faasmoe.planning.export import export
from faasmoe.planning.plan import PLAN_FILE
from faasmoe.planning.stack import StackSettings
from faasmoe.process import ServiceProcess

DEMO_TENANTS = ("alpha", "beta", "gamma")
TENANTS_FILE = "tenants.yaml"
METRICS_KEY_FILE = "metrics.key"  # the operator's key for /metrics, made on the first run
ROUTING_PROFILE_FILE = "routing-profile.json"  # what the predictors learned, kept across restarts
GATEWAY_URL_FILE = "gateway.url"  # where tools find the gateway (/function/*; /system/* is the control plane's)
GATEWAY_USER = "faasmoe"
# The gateway reads its credentials from these variables: never from argv, which `ps` shows to every user.
GATEWAY_USER_VARIABLE = "FAASMOE_GATEWAY_BASIC_AUTH_USER"
GATEWAY_PASSWORD_VARIABLE = "FAASMOE_GATEWAY_BASIC_AUTH_PASSWORD"
# `faasmoe up` builds the model on its first run: minutes.
UP_STARTUP_TIMEOUT_S = 900.0


class UpSettings(BaseModel):
    model: Path | None = Field(None, description="checkpoint directory; None builds the default model")
    tenants: Path | None = Field(None, description="tenants file; None writes one with three demo tenants")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    gateway_port: int | None = Field(None, description="None picks a free port")
    experts_per_function: int = Field(20, ge=1)
    layers_per_function: int = Field(1, ge=1)
    idle_timeout: PositiveDuration = Field("60s", description="functions scale to zero after this long idle")
    workdir: Path = Path(".faasmoe")
    # None: as `faasmoe serve` defaults them (ServeSettings), where they are validated.
    prewarm: PrewarmMode | None = None
    prewarm_threshold: float | None = None
    routing_profile: Path | None = Field(None, description=f"None: {ROUTING_PROFILE_FILE} in the workdir")
    routing_profile_interval_s: float | None = None
    keep_alive: KeepAliveMode | None = None
    replica_queue_target_ms: QueueTarget | None = None
    replica_scale_in_delay_s: float | None = Field(None, gt=0)
    default_preset: str = "qwen1.5-bench"  # the real per-layer shapes, shallow, small vocabulary


def up(settings: UpSettings, console: Console | None = None) -> None:
    import torch
    from pydantic import SecretStr

    from faasmoe.server.serve import serve
    from faasmoe.server.settings import ServeSettings

    console = console or Console(stderr=True)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = settings.model or _default_model(settings, console)
    plan_dir = _plan(model_dir, settings, console)
    tenants = settings.tenants or _demo_tenants(settings.workdir / TENANTS_FILE)
    routing_profile = settings.routing_profile or settings.workdir / ROUTING_PROFILE_FILE
    gateway_log = settings.workdir / "gateway.log"
    password = secrets.token_urlsafe(32)
    credentials = {GATEWAY_USER_VARIABLE: GATEWAY_USER, GATEWAY_PASSWORD_VARIABLE: password}
    with GatewayProcess(port=settings.gateway_port, env=os.environ | credentials, log_path=gateway_log) as gateway:
        (settings.workdir / GATEWAY_URL_FILE).write_text(gateway.url + "\n")
        console.print(f"gateway  {gateway.url}  (function logs: {gateway_log}; /system credentials: the control "
                      "plane's only)")  # fmt: skip
        console.print(f"endpoint http://{settings.host}:{settings.port}/v1  tenants: {tenants}")
        for tenant in yaml.safe_load(tenants.read_text())["tenants"]:
            console.print(f"  tenant {tenant['name']:<8} key {tenant['api_keys'][0]}")
        metrics_key = _metrics_key(settings.workdir / METRICS_KEY_FILE)
        console.print(f"metrics  http://{settings.host}:{settings.port}/metrics  (Authorization: Bearer the key in "
                      f"{settings.workdir / METRICS_KEY_FILE})")  # fmt: skip
        # The functions use the control plane's thread count, so results match in-process ones bit for bit.
        functions = StackSettings(weights_uri=str(plan_dir), threads=torch.get_num_threads(),
                                  zero_duration=settings.idle_timeout)  # fmt: skip
        hot_replicas = given(queue_target_ms=settings.replica_queue_target_ms,
                             scale_in_delay_s=settings.replica_scale_in_delay_s)  # fmt: skip
        serve(ServeSettings(model=model_dir, plan=plan_dir, gateway=gateway.url, tenants=tenants,
                            gateway_basic_auth=SecretStr(f"{GATEWAY_USER}:{password}"), reconcile=True,
                            functions=functions, metrics_key=SecretStr(metrics_key), host=settings.host,
                            port=settings.port, routing_profile=routing_profile,
                            **given(prewarm=settings.prewarm, prewarm_threshold=settings.prewarm_threshold,
                                    routing_profile_interval_s=settings.routing_profile_interval_s,
                                    keep_alive=settings.keep_alive, hot_replicas=hot_replicas or None)))  # fmt: skip


class UpProcess(ServiceProcess):
    """`faasmoe up` as a child process, ready once the control plane's /ready answers (demo, tests)."""

    name = "up"
    health_path = "/ready"

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("startup_timeout_s", UP_STARTUP_TIMEOUT_S)
        kwargs.setdefault("stop_timeout_s", 60.0)  # the control plane drains, then the gateway stops its functions
        super().__init__(**kwargs)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "faasmoe.cli", "up", "--host", self.host, "--port", str(self.port),
                *self.args]  # fmt: skip


def _default_model(settings: UpSettings, console: Console) -> Path:
    model_dir = settings.workdir / "models" / settings.default_preset
    if not (model_dir / "config.json").exists():
        with console.status(f"building the {settings.default_preset} model (random weights)"):
            init_model(model_dir, InitModelOptions(preset=settings.default_preset, router_skew=1.0))
    return model_dir


def _plan(model_dir: Path, settings: UpSettings, console: Console) -> Path:
    name = f"plan-e{settings.experts_per_function}-l{settings.layers_per_function}"
    plan_dir = settings.workdir / "plans" / model_dir.name / name
    if not (plan_dir / PLAN_FILE).exists():
        with console.status("exporting expert shards"):
            export(model_dir, plan_dir, settings.experts_per_function, settings.layers_per_function)
    return plan_dir.resolve()


def _demo_tenants(path: Path) -> Path:
    if not path.exists():
        tenants = [{"name": name, "api_keys": [f"sk-{name}-{secrets.token_hex(8)}"]} for name in DEMO_TENANTS]
        path.write_text(yaml.safe_dump({"tenants": tenants}, sort_keys=False))
        path.chmod(0o600)
    return path


def _metrics_key(path: Path) -> str:
    if not path.exists():
        path.touch(mode=0o600)  # readable by this user only, before the key is in it
        path.write_text(secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip()
