"""The systems under test, each started as real processes and always stopped again.

full-per-tenant   N x `faasmoe serve` (no gateway: the whole model in each process), one tenant each
full-shared       1 x `faasmoe serve` (no gateway) for every tenant
static-experts    embedded gateway + ONE always-on function with every expert + `faasmoe serve --gateway`
faasmoe-shared    embedded gateway, functions scaled to zero when idle + `faasmoe serve --gateway --mode shared`
faasmoe-private   the same with `--mode private` (an engine per tenant)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from faasmoe.bench.assets import Assets
from faasmoe.bench.deploy import deploy, stack_settings, wait_warm
from faasmoe.bench.loadgen import Endpoint
from faasmoe.bench.sampler import ProcessRoot
from faasmoe.bench.settings import BenchSettings, SystemKind
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.server.process import ServeProcess

MODEL_NAME = "bench"  # --served-model-name of every server
# The gateway checks idleness this often: a fraction of the idle timeout keeps scale-down prompt.
REAPER_FRACTION = 0.25


@dataclass(frozen=True)
class SystemSpec:
    kind: SystemKind
    experts_per_function: int  # the plan the system runs (every expert in one function without a sweep)
    layers_per_function: int

    @property
    def label(self) -> str:
        if not self.kind.sweeps_granularity:
            return self.kind.value
        suffix = f"-l{self.layers_per_function}" if self.layers_per_function != 1 else ""
        return f"{self.kind.value}/e{self.experts_per_function}{suffix}"


@dataclass
class RunningSystem:
    spec: SystemSpec
    endpoints: dict[str, Endpoint]  # by tenant
    roots: list[ProcessRoot]  # what the sampler walks
    deployed_functions: int
    startup_s: float  # launch until every server was ready (and static functions warm)


def system_specs(settings: BenchSettings, num_experts: int, num_layers: int) -> list[SystemSpec]:
    """The runs, in order; granularities beyond the model's expert count collapse into one."""
    specs: list[SystemSpec] = []
    for kind in settings.systems:
        if kind.sweeps_granularity:
            layers = min(settings.layers_per_function, num_layers)
            granularities = sorted({min(n, num_experts) for n in settings.experts_per_function})
            specs += [SystemSpec(kind, n, layers) for n in granularities]
        else:
            specs.append(SystemSpec(kind, num_experts, num_layers))
    return specs


@contextmanager
def launched(
    spec: SystemSpec, assets: Assets, tenants: list[str], settings: BenchSettings, log_dir: Path
) -> Iterator[RunningSystem]:
    """Starts the system, yields it once ready; every process started is stopped on the way out (also on
    errors and Ctrl-C), servers before the gateway they call."""
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with ExitStack() as processes:
        gateway_url, roots, functions = None, [], 0
        plan_dir = assets.plan(spec.experts_per_function, spec.layers_per_function)
        # Without a gateway (the full-model systems) the servers compute every expert in-process.
        if spec.kind not in (SystemKind.FULL_PER_TENANT, SystemKind.FULL_SHARED):
            gateway = processes.enter_context(_gateway(settings, log_dir))
            gateway_url = gateway.url
            roots.append(ProcessRoot(gateway.pid, "gateway", "function"))
            always_on = spec.kind is SystemKind.STATIC_EXPERTS
            names = deploy(gateway_url, plan_dir, stack_settings(plan_dir, always_on, settings))
            functions = len(names)
            if always_on:
                wait_warm(gateway_url, names, settings.startup_timeout)
        groups = [[t] for t in tenants] if spec.kind is SystemKind.FULL_PER_TENANT else [tenants]
        mode = "private" if spec.kind is SystemKind.FAASMOE_PRIVATE else "shared"
        servers = [
            _server(assets.model.path, plan_dir, group, gateway_url, mode, settings, log_dir / f"server-{index}")
            for index, group in enumerate(groups)
        ]
        for server in servers:
            processes.callback(server.stop)
            server.spawn()  # here, on the main thread, which their parent-death signal is bound to
        with ThreadPoolExecutor(len(servers)) as pool:  # the servers load side by side, as a fleet would
            list(pool.map(ServeProcess.wait_healthy, servers))
        roots += [ProcessRoot(server.pid, "control", "control") for server in servers]
        endpoints = {
            t: Endpoint(s.url, api_key(t), MODEL_NAME) for s, group in zip(servers, groups, strict=True) for t in group
        }
        yield RunningSystem(spec, endpoints, roots, functions, time.monotonic() - started)


def api_key(tenant: str) -> str:
    return f"sk-bench-{tenant}"


def _server(
    model: Path,
    plan_dir: Path,
    tenants: list[str],
    gateway_url: str | None,
    mode: str,
    settings: BenchSettings,
    log_base: Path,
) -> ServeProcess:
    """`faasmoe serve`; without a gateway the routed experts run in-process: the full-model server."""
    tenants_file = log_base.with_suffix(".tenants.yaml")
    tenants_file.write_text(yaml.safe_dump({"tenants": [{"name": t, "api_keys": [api_key(t)]} for t in tenants]}))
    args = ["--model", str(model), "--plan", str(plan_dir), "--tenants", str(tenants_file), "--mode", mode]
    args += ["--served-model-name", MODEL_NAME]
    if gateway_url is not None:
        args += ["--gateway", gateway_url]
    if settings.threads is not None:
        args += ["--threads", str(settings.threads)]
    return ServeProcess(args=args, log_path=log_base.with_suffix(".log"), startup_timeout_s=settings.startup_timeout)


def _gateway(settings: BenchSettings, log_dir: Path) -> GatewayProcess:
    args = ["--idle-timeout", str(settings.idle_timeout), "--log-dir", str(log_dir / "functions")]
    args += ["--reaper-interval", str(settings.idle_timeout * REAPER_FRACTION)]
    args += ["--function-spawn", settings.function_spawn]
    args += ["--cold-start-timeout", str(settings.startup_timeout)]
    return GatewayProcess(args=args, log_path=log_dir / "gateway.log")
