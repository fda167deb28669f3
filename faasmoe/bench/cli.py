"""The `faasmoe bench` command (registered in faasmoe/cli.py).

Each option is the BenchSettings field of the same name and defaults to None ("not given"), so that
--quick can fill in what was not given; the defaults themselves live in BenchSettings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from faasmoe.command import given, user_input

Opt = typer.Option
ELASTICITY_HELP = (
    "faasmoe-shared's serve --prewarm+--keep-alive modes, comma list (default off+fixed,predicted+fixed,"
    "predicted+adaptive)"
)


def bench_command(
    systems: Annotated[str | None, Opt(help="comma list (default every system)")] = None,
    experts_per_function: Annotated[str | None, Opt(help="faasmoe-* sweep, comma list (default 20)")] = None,
    layers_per_function: Annotated[int | None, Opt(help="MoE layers per function (default 1)")] = None,
    grouping: Annotated[
        str | None, Opt(help="faasmoe-shared's plan groupings, comma list: contiguous, popularity (default contiguous)")
    ] = None,
    idle_timeout: Annotated[float | None, Opt(help="function idle seconds before scale to zero (default 15)")] = None,
    elasticity: Annotated[str | None, Opt(help=ELASTICITY_HELP)] = None,
    full_per_tenant: Annotated[
        str | None, Opt(help="auto (default): N copies if they fit, else one extrapolated; all; one")
    ] = None,
    wake_repeats: Annotated[int | None, Opt(help="timed wakes of every function via the scale API (default 3)")] = None,
    preset: Annotated[str | None, Opt(help="init-model preset (default qwen1.5-bench)")] = None,
    layers: Annotated[int | None, Opt(help="model depth (default 6)")] = None,
    dtype: Annotated[str | None, Opt(help="bfloat16, float16 or float32")] = None,
    router_skew: Annotated[float | None, Opt(help="Zipf exponent of expert popularity, 0: none (default 1)")] = None,
    model_dir: Annotated[Path | None, Opt(help="an existing checkpoint instead of init-model")] = None,
    tenants: Annotated[int | None, Opt(help="number of tenants (default 6)")] = None,
    duration: Annotated[float | None, Opt(help="workload seconds (default 150)")] = None,
    requests: Annotated[int | None, Opt(help="cap on requests per tenant")] = None,
    rate: Annotated[float | None, Opt(help="Poisson requests/s per tenant while active (default 0.1)")] = None,
    burst: Annotated[float | None, Opt(help="active seconds of each tenant's cycle (default 20)")] = None,
    idle: Annotated[float | None, Opt(help="idle seconds after each burst, 0: none (default 45)")] = None,
    stagger: Annotated[float | None, Opt(help="tenants' phase spread, fraction of a cycle (default 0)")] = None,
    prompt_len: Annotated[str | None, Opt(help="N, uniform:A-B or lognormal:MEDIAN,SIGMA")] = None,
    output_len: Annotated[str | None, Opt(help="N, uniform:A-B or lognormal:MEDIAN,SIGMA")] = None,
    domain_size: Annotated[
        int | None, Opt(help="token ids of each tenant's own domain (default 32; 0: no domains)")
    ] = None,
    seed: Annotated[int | None, Opt(help="seed of the workload and the model (default 0)")] = None,
    trace: Annotated[Path | None, Opt(help="replay a JSON-lines trace")] = None,
    sample_interval: Annotated[float | None, Opt(help="seconds between OS samples (default 0.5)")] = None,
    price_per_gb_s: Annotated[float | None, Opt(help="$ per GB-s (default AWS Lambda's 0.0000166667)")] = None,
    base_memory_mib: Annotated[
        int | None, Opt(help="cost model: a replica's memory besides its weights, MiB (default: measured)")
    ] = None,
    threads: Annotated[int | None, Opt(help="torch threads of every server (default torch's)")] = None,
    function_threads: Annotated[int | None, Opt(help="torch threads per function (default cores/fan-out)")] = None,
    function_spawn: Annotated[str | None, Opt(help="fork (default) or exec function replicas")] = None,
    startup_timeout: Annotated[float | None, Opt(help="seconds for a system to be ready")] = None,
    request_timeout: Annotated[float | None, Opt(help="seconds for one request")] = None,
    drain_timeout: Annotated[float | None, Opt(help="seconds for in-flight requests after the trace")] = None,
    saturation_streams: Annotated[int | None, Opt(help="closed-loop streams, full/faasmoe-shared (off)")] = None,
    saturation_duration: Annotated[float | None, Opt(help="seconds of the saturation run (default 20)")] = None,
    out: Annotated[Path | None, Opt(help="results directory (default benchmarks/results)")] = None,
    work_dir: Annotated[Path | None, Opt(help="models, plans and logs (default $TMPDIR/faasmoe-bench)")] = None,
    quick: Annotated[bool, Opt("--quick", help="tiny model, 2 tenants, a short run (< 4 minutes)")] = False,
    progress: Annotated[bool, Opt(help="show a progress bar")] = True,
) -> None:
    """Measure faasmoe against the full-model baselines on a multi-tenant workload: memory, CPU, latency, cost."""
    # Flags count as given only when set to their non-default value (for the reproducing command line).
    options = given(**locals())
    options = {k: v for k, v in options.items() if (k, v) not in (("quick", False), ("progress", True))}
    from faasmoe.bench.runner import run_bench
    from faasmoe.bench.settings import BenchSettings

    # A FaasmoeError or bad settings ends the command with exit code 2 (faasmoe.command.FaasmoeGroup).
    with user_input():
        out_dir = run_bench(BenchSettings(**options))
    typer.echo(f"results in {out_dir}")
