"""The systems under test, each started as real processes and always stopped again.

full-per-tenant   N x `faasmoe serve` (no gateway: the whole model in each process), one tenant each
full-shared       1 x `faasmoe serve` (no gateway) for every tenant
static-experts    embedded gateway + ONE always-on function with every expert + `faasmoe serve --gateway`
faasmoe-shared    embedded gateway, functions scaled to zero when idle + `faasmoe serve --gateway --mode shared`,
                  once per --grouping and --elasticity mode (`--prewarm P --keep-alive K`)
faasmoe-private   the same with `--mode private` (an engine per tenant), with serve's default elasticity
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from faasmoe.bench.assets import Assets
from faasmoe.bench.breakdown import METRICS_KEY
from faasmoe.bench.deploy import deploy, stack_settings, wait_warm
from faasmoe.bench.loadgen import Endpoint
from faasmoe.bench.sampler import ProcessRoot
from faasmoe.bench.settings import BenchSettings, Elasticity, SystemKind
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.planning.grouping import Grouping
from faasmoe.server.process import ServeProcess
from faasmoe.server.settings import ServeSettings

MODEL_NAME = "bench"  # --served-model-name of every server
# The gateway checks idleness this often: a fraction of the idle timeout keeps scale-down prompt.
REAPER_FRACTION = 0.25
# A recorded profile counts every token alike: a day's half-life barely decays a pass of minutes.
PROFILE_HALF_LIFE_S = 86400.0
# What `faasmoe serve` runs when not told: faasmoe-private's elasticity (faasmoe-shared runs --elasticity).
SERVE_ELASTICITY = Elasticity(
    prewarm=ServeSettings.model_fields["prewarm"].default, keep_alive=ServeSettings.model_fields["keep_alive"].default
)


@dataclass(frozen=True)
class SystemSpec:
    kind: SystemKind
    experts_per_function: int  # the plan the system runs (every expert in one function without a sweep)
    layers_per_function: int
    elasticity: Elasticity | None = None  # --prewarm and --keep-alive of functions that scale to zero
    grouping: Grouping = Grouping.CONTIGUOUS  # how the plan groups experts (faasmoe/planning/grouping.py)

    @property
    def label(self) -> str:
        if not self.kind.sweeps_granularity:
            return self.kind.value
        suffix = f"-l{self.layers_per_function}" if self.layers_per_function != 1 else ""
        # Contiguous, every plan before groupings existed, is left out of the label.
        grouping = f"/{self.grouping.value}" if self.grouping is not Grouping.CONTIGUOUS else ""
        # faasmoe-shared runs once per elasticity mode; faasmoe-private always with serve's defaults.
        shared = self.kind is SystemKind.FAASMOE_SHARED and self.elasticity is not None
        mode = f"/{self.elasticity}" if shared else ""
        return f"{self.kind.value}/e{self.experts_per_function}{suffix}{grouping}{mode}"


@dataclass
class RunningSystem:
    spec: SystemSpec
    endpoints: dict[str, Endpoint]  # by tenant
    roots: list[ProcessRoot]  # what the sampler walks
    deployed_functions: int
    startup_s: float  # launch until every server was ready (and static functions warm)
    control_urls: list[str]  # every server's base URL, for /metrics
    plan_dir: Path
    gateway_url: str | None = None  # None: no gateway (the routed experts in-process)
    function_names: list[str] = field(default_factory=list)  # deployed on the gateway


def system_specs(settings: BenchSettings, num_experts: int, num_layers: int) -> list[SystemSpec]:
    """The runs, in order; granularities beyond the model's expert count collapse into one."""
    specs: list[SystemSpec] = []
    for kind in settings.systems:
        if kind.sweeps_granularity:
            layers = min(settings.layers_per_function, num_layers)
            granularities = sorted({min(n, num_experts) for n in settings.experts_per_function})
            shared = kind is SystemKind.FAASMOE_SHARED
            modes = settings.elasticity if shared else [SERVE_ELASTICITY]
            groupings = settings.grouping if shared else [Grouping.CONTIGUOUS]
            specs += [
                SystemSpec(kind, n, layers, mode, grouping)
                for n in granularities
                for grouping in groupings
                for mode in modes
            ]
        else:
            specs.append(SystemSpec(kind, num_experts, num_layers))
    return specs


@contextmanager
def launched(
    spec: SystemSpec,
    assets: Assets,
    tenants: list[str],
    settings: BenchSettings,
    log_dir: Path,
    routing_profile: Path | None = None,
) -> Iterator[RunningSystem]:
    """Starts the system, yields it once ready; every process started is stopped on the way out (also on
    errors and Ctrl-C), servers before the gateway they call. With ``routing_profile`` the servers record
    one there (`faasmoe serve --routing-profile`), written when they stop."""
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with ExitStack() as processes:
        gateway_url, roots, names = None, [], []
        plan_dir = assets.plan(spec.experts_per_function, spec.layers_per_function, spec.grouping)
        # Without a gateway (the full-model systems) the servers compute every expert in-process.
        if spec.kind not in (SystemKind.FULL_PER_TENANT, SystemKind.FULL_SHARED):
            gateway = processes.enter_context(_gateway(settings, log_dir))
            gateway_url = gateway.url
            roots.append(ProcessRoot(gateway.pid, "gateway", "function"))
            always_on = spec.kind is SystemKind.STATIC_EXPERTS
            names = deploy(gateway_url, plan_dir, stack_settings(plan_dir, always_on, settings))
            if always_on:
                wait_warm(gateway_url, names, settings.startup_timeout)
        groups = [[t] for t in tenants] if spec.kind is SystemKind.FULL_PER_TENANT else [tenants]
        mode = "private" if spec.kind is SystemKind.FAASMOE_PRIVATE else "shared"
        servers = [
            _server(assets.model.path, plan_dir, group, gateway_url, mode, spec.elasticity, settings,
                    log_dir / f"server-{index}", routing_profile)
            for index, group in enumerate(groups)
        ]  # fmt: skip
        for server in servers:
            processes.callback(server.stop)
            server.spawn()  # here, on the main thread, which their parent-death signal is bound to
        with ThreadPoolExecutor(len(servers)) as pool:  # the servers load side by side, as a fleet would
            list(pool.map(ServeProcess.wait_healthy, servers))
        roots += [ProcessRoot(server.pid, "control", "control") for server in servers]
        endpoints = {
            t: Endpoint(s.url, api_key(t), MODEL_NAME) for s, group in zip(servers, groups, strict=True) for t in group
        }
        urls = [server.url for server in servers]
        startup_s = time.monotonic() - started
        yield RunningSystem(spec, endpoints, roots, len(names), startup_s, urls, plan_dir, gateway_url, names)


def api_key(tenant: str) -> str:
    return f"sk-bench-{tenant}"


def _server(
    model: Path,
    plan_dir: Path,
    tenants: list[str],
    gateway_url: str | None,
    mode: str,
    elasticity: Elasticity | None,
    settings: BenchSettings,
    log_base: Path,
    routing_profile: Path | None = None,
) -> ServeProcess:
    """`faasmoe serve`; without a gateway the routed experts run in-process: the full-model server."""
    tenants_file = log_base.with_suffix(".tenants.yaml")
    tenants_file.write_text(yaml.safe_dump({"tenants": [{"name": t, "api_keys": [api_key(t)]} for t in tenants]}))
    args = ["--model", str(model), "--plan", str(plan_dir), "--tenants", str(tenants_file), "--mode", mode]
    args += ["--served-model-name", MODEL_NAME, "--metrics-key", METRICS_KEY]
    if gateway_url is not None:
        args += ["--gateway", gateway_url]
    if elasticity is not None:
        args += ["--prewarm", elasticity.prewarm.value, "--keep-alive", elasticity.keep_alive.value]
    if settings.threads is not None:
        args += ["--threads", str(settings.threads)]
    if routing_profile is not None:
        args += ["--routing-profile", str(routing_profile), "--routing-half-life", str(PROFILE_HALF_LIFE_S)]
    return ServeProcess(args=args, log_path=log_base.with_suffix(".log"), startup_timeout_s=settings.startup_timeout)


def _gateway(settings: BenchSettings, log_dir: Path) -> GatewayProcess:
    args = ["--idle-timeout", str(settings.idle_timeout), "--log-dir", str(log_dir / "functions")]
    args += ["--reaper-interval", str(settings.idle_timeout * REAPER_FRACTION)]
    args += ["--function-spawn", settings.function_spawn]
    args += ["--cold-start-timeout", str(settings.startup_timeout)]
    return GatewayProcess(args=args, log_path=log_dir / "gateway.log")
