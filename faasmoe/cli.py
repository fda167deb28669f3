"""The `faasmoe` command. Heavy imports stay inside commands so `faasmoe --help` is instant."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from faasmoe.command import BadOption, FaasmoeGroup, given, user_input

# A FaasmoeError or bad settings raised by any command ends it with `error: ...` and exit code 2 (FaasmoeGroup).
app = typer.Typer(
    cls=FaasmoeGroup,
    help="Serverless, multi-tenant serving of Mixture-of-Experts models on OpenFaaS.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


# They run until stopped: SIGTERM (systemd, Docker, Kubernetes, `kill`) ends them as Ctrl-C does, their
# children stopped and in-flight requests drained. Other commands keep Python's default: a killed
# `faasmoe export` must not look successful.
LONG_RUNNING_COMMANDS = frozenset({"gateway", "serve", "up"})
PREWARM_HELP = (
    "wake the functions a request will need before it reaches them: off, all (at admission), or predicted "
    "(default: at admission from the routing statistics, and the next layer's during each step)"
)
PREWARM_THRESHOLD_HELP = "predicted: wake the functions at least this likely to be invoked (default 0.05)"
ROUTING_PROFILE_HELP = "routing statistics file: loaded at start if it exists, written back (docs/elasticity.md)"
ROUTING_PROFILE_INTERVAL_HELP = "seconds between writes of the routing profile (default 60)"
KEEP_ALIVE_HELP = "fixed: every function its zero-duration label; adaptive (default): each its own, at most that"
REPLICA_QUEUE_TARGET_HELP = (
    "add a replica to a function whose calls wait longer than this (ms, mean) in its replicas, up to its "
    "com.openfaas.scale.max, and split its rows over them (default 100; 0 or off: never)"
)
MICRO_BATCHES_HELP = (
    "2: split each step in two, one half's routed experts in flight while the other half computes (default 1)"
)
REPLICA_SCALE_IN_DELAY_HELP = "seconds of low queueing before a replica added for it is taken back (default 60)"


@app.callback()
def _main(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand in LONG_RUNNING_COMMANDS:
        from faasmoe.process import exit_on_sigterm

        exit_on_sigterm()


@app.command("init-model")
def init_model_command(
    out: Annotated[Path, typer.Argument(help="directory to write the checkpoint to")],
    preset: Annotated[
        str,
        typer.Option(
            help="a preset of docs/families.md: tiny, small-mixed, qwen1.5-moe-a2.7b, qwen3-30b-a3b, mixtral-8x7b, "
            "olmoe-1b-7b, moonlight-16b-a3b, gpt-oss-20b, or a family's tiny one"
        ),
    ] = "tiny",
    layers: Annotated[int | None, typer.Option(help="number of layers (shrinks the preset's depth)")] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32")] = "bfloat16",
    seed: Annotated[int, typer.Option(help="random seed of the weights")] = 0,
    router_skew: Annotated[float, typer.Option(help="Zipf exponent of expert popularity (0: uniform)")] = 0.0,
    max_shard_size: Annotated[str, typer.Option(help="shard the checkpoint above this size, e.g. 50MB")] = "5GB",
) -> None:
    """Write a randomly initialised MoE checkpoint (its family's hub format) and a tokenizer. Downloads nothing."""
    from faasmoe.model.init_model import InitModelOptions, init_model

    options = InitModelOptions(preset, layers, dtype, seed, router_skew, max_shard_size)
    with user_input(), _spinner(f"initialising {preset} model"):
        init_model(out, options)
    typer.echo(f"wrote {out}")


# The cost model's options (faasmoe/planning/cost.py: CostSettings), shared by `plan-cost` and `export ... auto`.
PricePerGbS = Annotated[
    float | None, typer.Option(help="dollars per GB-s of function memory held warm (default 0.0000166667)")
]
PricePerInvocation = Annotated[float | None, typer.Option(help="dollars per invocation (default 0.0000002)")]
PricePerColdStart = Annotated[
    float | None,
    typer.Option(help="dollars per cold start (default: --cold-start-s x the experts' GB x --price-per-gb-s)"),
]
ColdStartS = Annotated[float | None, typer.Option(help="seconds a cold start stalls a step (default 1)")]
CostZeroDuration = Annotated[
    str | None, typer.Option(help="keep-alive after a function's last invocation, e.g. 5m (default 5m)")
]
TokensPerSecond = Annotated[float | None, typer.Option(help="the load (default: the routing profile's)")]
TokensPerStep = Annotated[int | None, typer.Option(help="a tenant's tokens per step (default 1)")]
BaseMemoryMib = Annotated[int | None, typer.Option(help="a replica's memory besides its weights (default 384)")]
CostMemory = Annotated[
    str | None,
    typer.Option(
        "--memory",
        help="billed: a warm function holds its shard + base, as a platform bills it (default); resident: its "
        "base + the pages of its experts invoked within the keep-alive, as a node's PSS measures it",
    ),
]
PLAN_ROUTING_PROFILE_HELP = "routing profile recorded by `faasmoe serve --routing-profile` (docs/deployment-cost.md)"


@app.command("export")
def export_command(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face MoE checkpoint: qwen2_moe, qwen3_moe or mixtral")],
    out_dir: Annotated[Path, typer.Argument(help="plan directory to write")],
    experts_per_function: Annotated[
        str, typer.Option(help="experts per function per layer (N), or auto: the cheapest by the cost model")
    ] = "20",
    layers_per_function: Annotated[int, typer.Option(help="consecutive MoE layers per function (M)")] = 1,
    prefix: Annotated[str, typer.Option(help="function name prefix")] = "moe",
    grouping: Annotated[
        str | None,
        typer.Option(help="contiguous (default: by index) or popularity (hot experts together); auto tries both"),
    ] = None,
    routing_profile: Annotated[
        Path | None, typer.Option(help=PLAN_ROUTING_PROFILE_HELP + "; needed by popularity and auto")
    ] = None,
    price_per_gb_s: PricePerGbS = None,
    price_per_invocation: PricePerInvocation = None,
    price_per_cold_start: PricePerColdStart = None,
    cold_start_s: ColdStartS = None,
    zero_duration: CostZeroDuration = None,
    tokens_per_second: TokensPerSecond = None,
    tokens_per_step: TokensPerStep = None,
    base_memory_mib: BaseMemoryMib = None,
    memory: CostMemory = None,
) -> None:
    """Group the routed experts into functions: plan.json, one shard per function, the trunk weights."""
    from rich.progress import Progress

    from faasmoe.model.checkpoint import Checkpoint
    from faasmoe.planning.cost import CostSettings, cheapest, estimate_candidates
    from faasmoe.planning.cost_table import format_estimates
    from faasmoe.planning.export import export
    from faasmoe.planning.grouping import Grouping
    from faasmoe.planning.plan import ModelShape, Plan
    from faasmoe.planning.profile import popularity, read_profile

    if grouping not in (None, *(g.value for g in Grouping)):
        raise BadOption(f"--grouping must be contiguous or popularity, got {grouping!r}")
    chosen_grouping = Grouping(grouping or Grouping.CONTIGUOUS)
    auto = experts_per_function == "auto"
    size = None if auto else _experts_per_function(experts_per_function)
    costs = given(price_per_gb_s=price_per_gb_s, price_per_invocation=price_per_invocation,
                  price_per_cold_start=price_per_cold_start, cold_start_s=cold_start_s, zero_duration=zero_duration,
                  tokens_per_second=tokens_per_second, tokens_per_step=tokens_per_step,
                  base_memory_mib=base_memory_mib, memory=memory)  # fmt: skip
    if routing_profile is None and (auto or chosen_grouping is Grouping.POPULARITY):
        raise BadOption("--grouping popularity and --experts-per-function auto need --routing-profile FILE")
    if costs and not auto:
        raise BadOption(f"--{next(iter(costs)).replace('_', '-')} is for --experts-per-function auto only")
    shape = ModelShape.of(Checkpoint.open(model_dir))
    profile = read_profile(routing_profile, shape) if routing_profile is not None else None
    hot = popularity(profile) if profile is not None else None
    if auto:  # every size, in the given grouping or in both
        groupings = [chosen_grouping] if grouping is not None else list(Grouping)
        estimates = estimate_candidates(shape, layers_per_function, profile, CostSettings(**costs), groupings)
        chosen = cheapest(estimates)
        typer.echo(format_estimates(estimates, chosen))
        size, chosen_grouping = chosen.experts_per_function, chosen.grouping
    count = len(Plan.group(shape, size, layers_per_function, prefix, chosen_grouping, hot).functions)
    with Progress(transient=True) as progress:
        task = progress.add_task("writing function shards", total=count)
        plan = export(
            model_dir,
            out_dir,
            size,
            layers_per_function,
            prefix,
            on_function=lambda _: progress.advance(task),
            grouping=chosen_grouping,
            popularity=hot,
        )
    weights = sum(f.bytes for f in plan.functions)
    typer.echo(
        f"wrote {out_dir}: {len(plan.functions)} functions ({plan.grouping.value}, {plan.experts_per_function} "
        f"experts x {plan.layers_per_function} layer(s) each), {weights / 1e6:.1f} MB of experts"
    )


@app.command("plan-cost")
def plan_cost_command(
    plan_dir: Annotated[Path, typer.Argument(help="plan directory written by `faasmoe export`")],
    routing_profile: Annotated[Path, typer.Option(help=PLAN_ROUTING_PROFILE_HELP)],
    price_per_gb_s: PricePerGbS = None,
    price_per_invocation: PricePerInvocation = None,
    price_per_cold_start: PricePerColdStart = None,
    cold_start_s: ColdStartS = None,
    zero_duration: CostZeroDuration = None,
    tokens_per_second: TokensPerSecond = None,
    tokens_per_step: TokensPerStep = None,
    base_memory_mib: BaseMemoryMib = None,
    memory: CostMemory = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the estimates as one JSON list")] = False,
) -> None:
    """The cost model at a routing profile's load: the plan and every candidate grouping of its model, per hour."""
    from faasmoe.planning.cost import CostSettings, cheapest, compare
    from faasmoe.planning.cost_table import format_estimates
    from faasmoe.planning.plan import Plan
    from faasmoe.planning.profile import read_profile

    plan = Plan.load(plan_dir)
    settings = CostSettings(**given(price_per_gb_s=price_per_gb_s, price_per_invocation=price_per_invocation,
                                    price_per_cold_start=price_per_cold_start, cold_start_s=cold_start_s,
                                    zero_duration=zero_duration, tokens_per_second=tokens_per_second,
                                    tokens_per_step=tokens_per_step, base_memory_mib=base_memory_mib,
                                    memory=memory))  # fmt: skip
    estimates = compare(plan, read_profile(routing_profile, plan.model), settings)
    if as_json:
        typer.echo(json.dumps([e.model_dump(mode="json") for e in estimates]))
    else:
        typer.echo(format_estimates(estimates, cheapest(estimates)))


@app.command("generate")
def generate_command(
    model: Annotated[Path, typer.Option(help="checkpoint directory (config, tokenizer, weights)")],
    plan: Annotated[Path | None, typer.Option(help="plan directory (default: a fresh one in a temp folder)")] = None,
    prompt: Annotated[str | None, typer.Option(help="prompt text")] = None,
    prompt_ids: Annotated[str | None, typer.Option(help="prompt token ids, comma separated")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=0)] = 16,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    seed: Annotated[int | None, typer.Option()] = None,
    gateway: Annotated[str | None, typer.Option(help="OpenFaaS gateway URL: run experts as functions there")] = None,
    basic_auth: Annotated[str | None, typer.Option(help="USER:PASSWORD for the gateway")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Generate through the split path (greedy by default), in-process or through a gateway."""
    if (prompt is None) == (prompt_ids is None):
        raise BadOption("give exactly one of --prompt and --prompt-ids")
    with tempfile.TemporaryDirectory(prefix="faasmoe-plan-") as scratch:
        result = _generate(
            model, plan, Path(scratch), prompt, prompt_ids, max_new_tokens, temperature, seed, gateway, basic_auth
        )
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(result["text"])


def _generate(
    model, plan_dir, scratch, prompt, prompt_ids, max_new_tokens, temperature, seed, gateway, basic_auth
) -> dict:
    from functools import partial

    from faasmoe.dispatch.executor import open_executor
    from faasmoe.gateway.client import GatewaySettings
    from faasmoe.model.generate import generate
    from faasmoe.model.sampling import SamplingParams
    from faasmoe.model.split_model import SplitModel
    from faasmoe.planning.export import export

    started = time.perf_counter()
    if plan_dir is None:
        plan_dir = scratch / "plan"
        export(model, plan_dir, experts_per_function=20)
    with user_input():
        settings = GatewaySettings.from_url(gateway, basic_auth) if gateway is not None else None
    split = SplitModel.load(model, plan_dir, partial(open_executor, gateway=settings))
    try:
        ids = split.tokenizer.encode(prompt) if prompt is not None else _parse_ids(prompt_ids, split.vocab_size)
        loaded = time.perf_counter()
        params = SamplingParams(max_new_tokens, temperature, seed=seed, stop_token_ids=())
        tokens = generate(split.trunk, [ids], params)[0]
        done = time.perf_counter()
    finally:
        split.close()
    return {
        "prompt_token_ids": ids,
        "token_ids": tokens,
        "text": split.tokenizer.decode(tokens),
        "timings": {
            "load_s": loaded - started,
            "generate_s": done - loaded,
            "tokens_per_s": len(tokens) / max(done - loaded, 1e-9),
        },
    }


@app.command("stack")
def stack_command(
    plan_dir: Annotated[Path, typer.Argument(help="plan directory written by `faasmoe export`")],
    out: Annotated[Path, typer.Option(help="where to write stack.yml")] = Path("stack.yml"),
    image: Annotated[str | None, typer.Option(help="the expert-group function image")] = None,
    gateway: Annotated[str | None, typer.Option(help="provider.gateway URL")] = None,
    weights_uri: Annotated[str | None, typer.Option(help="the plan directory as functions see it")] = None,
    zero_duration: Annotated[str | None, typer.Option(help="idle time before scale to zero, e.g. 5m")] = None,
) -> None:
    """Write stack.yml for `faas-cli deploy`: one function per plan entry."""
    from faasmoe.planning.plan import Plan
    from faasmoe.planning.stack import StackSettings, write_stack

    plan = Plan.load(plan_dir)
    options = given(image=image, gateway=gateway, weights_uri=weights_uri, zero_duration=zero_duration)
    write_stack(plan, out, StackSettings(**options))
    typer.echo(f"wrote {out}: {len(plan.functions)} functions")


@app.command("deploy")
def deploy_command(
    plan_dir: Annotated[Path, typer.Argument(help="plan directory written by `faasmoe export`")],
    gateway: Annotated[str, typer.Option(help="OpenFaaS gateway URL")],
    basic_auth: Annotated[str | None, typer.Option(help="USER:PASSWORD for /system/*")] = None,
    image: Annotated[str | None, typer.Option(help="the expert-group function image")] = None,
    weights_uri: Annotated[
        str | None, typer.Option(help="plan directory as functions see it (default: its path)")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads per function (exactness: match the trunk)")] = None,
    zero_duration: Annotated[str | None, typer.Option(help="idle time before scale to zero, e.g. 5m")] = None,
) -> None:
    """Deploy (or update) every function of a plan through the gateway API, like `faas-cli deploy`."""
    import asyncio

    from faasmoe.gateway.client import GatewayClient, GatewaySettings
    from faasmoe.planning.deploy import deploy_plan
    from faasmoe.planning.plan import Plan
    from faasmoe.planning.stack import StackSettings

    async def run() -> list[str]:
        async with GatewayClient(gateway_settings) as client:
            return await deploy_plan(plan, client, settings)

    with user_input():
        gateway_settings = GatewaySettings.from_url(gateway, basic_auth)
    plan = Plan.load(plan_dir)
    weights_uri = weights_uri or str(plan_dir.resolve())
    options = given(image=image, weights_uri=weights_uri, threads=threads, zero_duration=zero_duration)
    settings = StackSettings(**options)
    names = asyncio.run(run())
    typer.echo(f"deployed {len(names)} functions to {gateway}")


@app.command("gateway")
def gateway_command(
    host: Annotated[
        str | None, typer.Option(help="listen address (default 127.0.0.1; loopback only without --basic-auth)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="listen port (default 8080)")] = None,
    idle_timeout: Annotated[float | None, typer.Option(help="seconds idle before scale to zero (default 300)")] = None,
    basic_auth: Annotated[
        str | None,
        typer.Option(help="USER:PASSWORD required on /system/* (or FAASMOE_GATEWAY_BASIC_AUTH_USER/_PASSWORD)"),
    ] = None,
    cold_start_timeout: Annotated[float | None, typer.Option(help="seconds a replica may take to be ready")] = None,
    function_command: Annotated[str | None, typer.Option(help="command of a replica, shell-quoted")] = None,
    function_spawn: Annotated[
        str | None, typer.Option(help="fork replicas from a pre-imported runtime, or exec each anew (default fork)")
    ] = None,
    log_dir: Annotated[Path | None, typer.Option(help="directory of the function logs (default: a temp dir)")] = None,
    reaper_interval: Annotated[float | None, typer.Option(help="seconds between idleness checks")] = None,
    scale_to_zero: Annotated[
        bool | None, typer.Option(help="default for functions without the com.openfaas.scale.zero label (default on)")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, ...")] = None,
    allow_env_process: Annotated[
        bool,
        typer.Option("--allow-env-process", help="run a deployment's envProcess command and any envVars (needs auth)"),
    ] = False,
    allow_env_var: Annotated[
        list[str] | None,
        typer.Option(help="envVars name (fnmatch pattern) deployments may set beyond FAASMOE_* and thread counts"),
    ] = None,
    max_body_bytes: Annotated[
        int | None, typer.Option(help="larger invocation bodies get 413 (default 64 MiB)")
    ] = None,
    direct_replicas: Annotated[
        bool | None,
        typer.Option(help="name the serving replica in invocation answers, so callers may skip this hop (default on)"),
    ] = None,
) -> None:
    """Run the embedded OpenFaaS-compatible gateway: each function a local process, scaled to and from zero."""
    import shlex

    from pydantic import SecretStr

    from faasmoe.gateway.client import parse_basic_auth
    from faasmoe.gateway.embedded import EmbeddedGatewaySettings, run_gateway

    # Options not given keep the FAASMOE_GATEWAY_* variable or the default.
    options = given(host=host, port=port, idle_timeout_s=idle_timeout, cold_start_timeout_s=cold_start_timeout,
                    function_spawn=function_spawn, log_dir=log_dir, reaper_interval_s=reaper_interval,
                    scale_to_zero_default=scale_to_zero, log_level=log_level, allow_env_vars=allow_env_var,
                    max_body_bytes=max_body_bytes, allow_env_process=allow_env_process or None,
                    direct_replicas=direct_replicas)  # fmt: skip
    with user_input():
        if function_command is not None:
            options["function_command"] = shlex.split(function_command)
        if basic_auth is not None:
            user, password = parse_basic_auth(basic_auth)
            options |= {"basic_auth_user": user, "basic_auth_password": SecretStr(password)}
    run_gateway(EmbeddedGatewaySettings(**options))


@app.command("serve")
def serve_command(
    model: Annotated[Path | None, typer.Option(help="checkpoint directory (config, tokenizer)")] = None,
    plan: Annotated[Path | None, typer.Option(help="plan directory written by `faasmoe export`")] = None,
    tenants: Annotated[Path | None, typer.Option(help="tenants file (YAML)")] = None,
    gateway: Annotated[str | None, typer.Option(help="OpenFaaS gateway URL; without it experts run in-process")] = None,
    gateway_basic_auth: Annotated[str | None, typer.Option(help="USER:PASSWORD for the gateway")] = None,
    host: Annotated[str | None, typer.Option(help="listen address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (default 8000)")] = None,
    mode: Annotated[str | None, typer.Option(help="shared (one control plane) or private (one per tenant)")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="model id in /v1/models (default: folder name)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    micro_batches: Annotated[int | None, typer.Option(help=MICRO_BATCHES_HELP)] = None,
    metrics_key: Annotated[
        str | None, typer.Option(help="Bearer key opening /metrics (or FAASMOE_SERVE_METRICS_KEY; default: off)")
    ] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="larger request bodies get 413 (default 4 MiB)")] = None,
    reconcile: Annotated[
        bool | None, typer.Option(help="deploy the plan's missing functions, update changed ones (default off)")
    ] = None,
    reconcile_interval: Annotated[float | None, typer.Option(help="seconds between reconciling (default 5)")] = None,
    function_image: Annotated[str | None, typer.Option(help="reconcile: the expert-group function image")] = None,
    function_weights_uri: Annotated[
        str | None, typer.Option(help="reconcile: the plan directory as functions see it (default: --plan)")
    ] = None,
    function_threads: Annotated[int | None, typer.Option(help="reconcile: torch threads (default: --threads)")] = None,
    function_zero_duration: Annotated[
        str | None, typer.Option(help="reconcile: idle time before scale to zero, e.g. 5m")
    ] = None,
    prewarm: Annotated[str | None, typer.Option(help=PREWARM_HELP)] = None,
    prewarm_threshold: Annotated[float | None, typer.Option(help=PREWARM_THRESHOLD_HELP)] = None,
    routing_profile: Annotated[Path | None, typer.Option(help=ROUTING_PROFILE_HELP)] = None,
    routing_profile_interval: Annotated[float | None, typer.Option(help=ROUTING_PROFILE_INTERVAL_HELP)] = None,
    routing_half_life: Annotated[
        float | None, typer.Option(help="seconds in which routing statistics decay to half (default 600)")
    ] = None,
    keep_alive: Annotated[str | None, typer.Option(help=KEEP_ALIVE_HELP)] = None,
    replica_queue_target_ms: Annotated[str | None, typer.Option(help=REPLICA_QUEUE_TARGET_HELP)] = None,
    replica_scale_in_delay: Annotated[float | None, typer.Option(help=REPLICA_SCALE_IN_DELAY_HELP)] = None,
) -> None:
    """Serve the OpenAI-compatible multi-tenant API (options also from FAASMOE_SERVE_* variables)."""
    from faasmoe.server.serve import serve
    from faasmoe.server.settings import ServeSettings

    functions = given(image=function_image, weights_uri=function_weights_uri, threads=function_threads,
                      zero_duration=function_zero_duration)  # fmt: skip
    hot_replicas = given(queue_target_ms=replica_queue_target_ms, scale_in_delay_s=replica_scale_in_delay)
    serve(ServeSettings(**given(model=model, plan=plan, tenants=tenants, gateway=gateway,
                                gateway_basic_auth=gateway_basic_auth, host=host, port=port, mode=mode,
                                served_model_name=served_model_name, threads=threads, reconcile=reconcile,
                                micro_batches=micro_batches, reconcile_interval_s=reconcile_interval,
                                functions=functions or None,
                                metrics_key=metrics_key, max_body_bytes=max_body_bytes, prewarm=prewarm,
                                prewarm_threshold=prewarm_threshold, routing_profile=routing_profile,
                                routing_profile_interval_s=routing_profile_interval,
                                routing_half_life_s=routing_half_life, keep_alive=keep_alive,
                                hot_replicas=hot_replicas or None)))  # fmt: skip


@app.command("up")
def up_command(
    model: Annotated[Path | None, typer.Option(help="checkpoint directory (default: build the demo model)")] = None,
    tenants: Annotated[Path | None, typer.Option(help="tenants file (default: three demo tenants)")] = None,
    host: Annotated[str, typer.Option(help="listen address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="listen port")] = 8000,
    experts_per_function: Annotated[int, typer.Option(min=1)] = 20,
    layers_per_function: Annotated[int, typer.Option(min=1)] = 1,
    idle_timeout: Annotated[str, typer.Option(help="functions scale to zero after this long idle")] = "60s",
    workdir: Annotated[Path, typer.Option(help="models, plans, tenants and logs")] = Path(".faasmoe"),
    prewarm: Annotated[str | None, typer.Option(help=PREWARM_HELP)] = None,
    prewarm_threshold: Annotated[float | None, typer.Option(help=PREWARM_THRESHOLD_HELP)] = None,
    routing_profile: Annotated[
        Path | None, typer.Option(help=ROUTING_PROFILE_HELP + " (default: routing-profile.json in --workdir)")
    ] = None,
    routing_profile_interval: Annotated[float | None, typer.Option(help=ROUTING_PROFILE_INTERVAL_HELP)] = None,
    keep_alive: Annotated[str | None, typer.Option(help=KEEP_ALIVE_HELP)] = None,
    replica_queue_target_ms: Annotated[str | None, typer.Option(help=REPLICA_QUEUE_TARGET_HELP)] = None,
    replica_scale_in_delay: Annotated[float | None, typer.Option(help=REPLICA_SCALE_IN_DELAY_HELP)] = None,
) -> None:
    """The whole platform on this machine: embedded gateway, functions, control plane. Ctrl-C or SIGTERM stops all."""
    from faasmoe.up import UpSettings, up

    up(UpSettings(model=model, tenants=tenants, host=host, port=port, experts_per_function=experts_per_function,
                  layers_per_function=layers_per_function, idle_timeout=idle_timeout, workdir=workdir,
                  prewarm=prewarm, prewarm_threshold=prewarm_threshold, routing_profile=routing_profile,
                  routing_profile_interval_s=routing_profile_interval, keep_alive=keep_alive,
                  replica_queue_target_ms=replica_queue_target_ms,
                  replica_scale_in_delay_s=replica_scale_in_delay))  # fmt: skip


def _experts_per_function(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise BadOption(f"--experts-per-function must be a positive integer or auto, got {text!r}")
    return int(text)


def _parse_ids(text: str, vocab_size: int) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadOption(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if not ids or bad:
        raise BadOption(f"--prompt-ids must be non-empty token ids in [0, {vocab_size}); bad: {bad[:5]}")
    return ids


class _spinner:
    """A rich status line for steps that take more than a few seconds."""

    def __init__(self, message: str) -> None:
        from rich.console import Console

        self.status = Console(stderr=True).status(message)

    def __enter__(self) -> None:
        self.status.__enter__()

    def __exit__(self, *exc) -> None:
        self.status.__exit__(*exc)


# `faasmoe bench`: its options are BenchSettings' fields, declared with the benchmark.
from faasmoe.bench.cli import bench_command  # noqa: E402

app.command("bench")(bench_command)


if __name__ == "__main__":
    app()
