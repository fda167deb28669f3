"""A warm decode step at depth: experts in-process (`local`) against the same split through the embedded
gateway, with every call through the gateway (`gateway`, `--no-direct-replicas`), with calls straight
to the warm replicas the gateway named (`direct`, the default), and direct with two micro-batches per step
(`overlap`: one half's routed experts in flight while the other half computes; batch 1 cannot split).

Model: qwen1.5-bench shapes (hidden 2048, 60 experts top-4, moe_intermediate 1408, bf16) with
``--layers`` MoE layers (default 6), random weights, built once under ``--work``. The plan has
``--experts-per-function`` experts per function (default 20: 3 functions per layer). Each system loads
the split model, prefills 8 tokens per sequence, then times ``--steps`` decode steps at each batch size;
the figure is their median. Systems alternate over ``--rounds`` rounds in one run, so that a change in the
machine's load shows as spread between rounds rather than as a difference between systems.

    .venv/bin/python benchmarks/step_bench.py [--layers 6] [--experts-per-function 20] [--rounds 2]

Figures are printed and written to benchmarks/results/step.json with the load average; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from faasmoe.dispatch.executor import open_executor
from faasmoe.gateway.client import GatewayClient, GatewaySettings
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.model.init_model import InitModelOptions, init_model
from faasmoe.model.split_model import OpenExecutor, SplitModel
from faasmoe.planning.deploy import deploy_plan
from faasmoe.planning.export import export
from faasmoe.planning.plan import Plan
from faasmoe.planning.stack import StackSettings

RESULTS = Path(__file__).parent / "results" / "step.json"
PROMPT = [11, 42, 7, 300, 5, 19, 77, 2]


def prepare(work: Path, layers: int, experts_per_function: int) -> tuple[Path, Path]:
    """The model and its plan, built once and kept in ``work``."""
    model, plan = work / f"model-l{layers}", work / f"model-l{layers}-plan-e{experts_per_function}"
    if not (model / "config.json").exists():
        print(f"init-model qwen1.5-bench --layers {layers} ...", flush=True)
        init_model(model, InitModelOptions(preset="qwen1.5-bench", layers=layers))
    if not (plan / "plan.json").exists():
        print(f"export --experts-per-function {experts_per_function} ...", flush=True)
        export(model, plan, experts_per_function=experts_per_function)
    return model, plan


def median_step_ms(model: SplitModel, batch: int, steps: int) -> float:
    sequences = [model.trunk.new_sequence([PROMPT[0] + i, *PROMPT[1:]]) for i in range(batch)]
    for seq, row in zip(sequences, model.trunk.step(sequences), strict=True):  # the prefill
        seq.new_tokens = [int(torch.argmax(row))]
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        logits = model.trunk.step(sequences)
        times.append(time.perf_counter() - started)
        for seq, row in zip(sequences, logits, strict=True):
            seq.new_tokens = [int(torch.argmax(row))]
    return statistics.median(times) * 1000


def measure(
    model_dir: Path, plan_dir: Path, executor: OpenExecutor, batches: list[int], steps: int, micro_batches: int = 1
) -> dict:
    model = SplitModel.load(model_dir, plan_dir, executor)
    model.trunk.micro_batches = micro_batches
    try:
        median_step_ms(model, 1, 2)  # every function warm, every buffer allocated
        return {batch: median_step_ms(model, batch, steps) for batch in batches}
    finally:
        model.close()


def through_gateway(
    model_dir: Path, plan_dir: Path, threads: int, direct: bool, run: Callable[[OpenExecutor], dict]
) -> dict:
    with GatewayProcess(args=[] if direct else ["--no-direct-replicas"]) as gateway:
        settings = GatewaySettings(base_url=gateway.url, trust_env=False)

        async def deploy() -> None:
            async with GatewayClient(settings) as client:
                stack = StackSettings(weights_uri=str(plan_dir), threads=threads, zero_duration="30m")
                await deploy_plan(Plan.load(plan_dir), client, stack)

        asyncio.run(deploy())
        return run(partial(open_executor, gateway=settings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/faasmoe-step-bench"))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts-per-function", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--function-threads", type=int, default=None, help="torch threads per replica (--threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir, plan_dir = prepare(args.work, args.layers, args.experts_per_function)

    def run(executor: OpenExecutor, micro_batches: int = 1) -> dict:
        return measure(model_dir, plan_dir, executor, args.batches, args.steps, micro_batches)

    function_threads = args.function_threads or args.threads
    rounds = []
    for index in range(args.rounds):
        local = run(open_executor)
        gateway = through_gateway(model_dir, plan_dir, function_threads, False, run)
        direct = through_gateway(model_dir, plan_dir, function_threads, True, run)
        overlap = through_gateway(model_dir, plan_dir, function_threads, True, partial(run, micro_batches=2))
        rounds.append({"local": local, "gateway": gateway, "direct": direct, "overlap": overlap})
        for batch in args.batches:
            print(f"round {index + 1} batch {batch}: local {local[batch]:.1f} ms, gateway {gateway[batch]:.1f} ms "
                  f"({gateway[batch] / local[batch]:.2f}x), direct {direct[batch]:.1f} ms "
                  f"({direct[batch] / local[batch]:.2f}x), overlap {overlap[batch]:.1f} ms "
                  f"({overlap[batch] / local[batch]:.2f}x)", flush=True)  # fmt: skip
    result = {
        "model": f"qwen1.5-bench, {args.layers} MoE layers",
        "experts_per_function": args.experts_per_function,
        "threads": args.threads,
        "steps": args.steps,
        "load_average": os.getloadavg(),
        "rounds": rounds,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
