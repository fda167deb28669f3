"""The long run: mixed multi-tenant traffic with faults for ten minutes or more, every answer checked.

Usage: python benchmarks/soak.py [--duration 600] [--clients 6] [--fault-every 20] [--preset tiny]

A random checkpoint (real hub format) is exported with 5 experts per function and served by an
embedded gateway with generated credentials and a control plane that deploys and reconciles its plan
(faasmoe/bench/chaos.py, the harness of tests/test_faults.py). Closed-loop clients of four tenants send
greedy completions, streamed and whole, whose tokens were computed in-process beforehand. Every
``--fault-every`` seconds (jittered) one fault is injected: a replica killed (SIGKILL), the function
runtime killed, or the gateway killed and restarted on the same port. The report counts requests, 5xx,
wrong, lost and hung, and checks every prompt of every tenant once before and once after the faults.
Figures go to benchmarks/results/soak.json and are printed; they are reported, not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from faasmoe.bench.chaos import Fault, FaultInjector, Tally, Tenant, Traffic, platform_under_test, reference_probes
from faasmoe.model.init_model import InitModelOptions, init_model
from faasmoe.planning.export import export

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
TENANTS = [Tenant(name, f"sk-{name}-soak-{i:04d}") for i, name in enumerate(["alpha", "beta", "gamma", "delta"])]
# Kills of replicas are the common fault; the runtime and the gateway die more rarely.
FAULT_WEIGHTS = {Fault.KILL_REPLICA: 6, Fault.KILL_ZYGOTE: 2, Fault.RESTART_GATEWAY: 1}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic with faults")
    parser.add_argument("--clients", type=int, default=6, help="closed-loop clients")
    parser.add_argument("--fault-every", type=float, default=20.0, help="mean seconds between faults")
    parser.add_argument("--preset", default="tiny", help="model preset (random weights)")
    parser.add_argument("--prompts", type=int, default=8, help="distinct prompts")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trunk and of each function")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="model, plan and logs (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def fault_schedule(duration_s: float, every_s: float, rng: random.Random) -> list[tuple[float, Fault]]:
    schedule, at = [], 0.0
    kinds, weights = list(FAULT_WEIGHTS), list(FAULT_WEIGHTS.values())
    while True:
        at += rng.uniform(0.5 * every_s, 1.5 * every_s)
        if at >= duration_s:
            return schedule
        schedule.append((at, rng.choices(kinds, weights)[0]))


async def soak(args: argparse.Namespace, traffic: Traffic, injector: FaultInjector, tallies: dict[str, Tally]) -> None:
    await traffic.round(tallies["before"])
    schedule = fault_schedule(args.duration, args.fault_every, random.Random(args.seed))
    end = time.monotonic() + args.duration
    await asyncio.gather(
        injector.run(schedule), traffic.run(args.clients, lambda: time.monotonic() >= end, tallies["during"], args.seed)
    )
    await traffic.round(tallies["after"])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="faasmoe-soak-"))
    model_dir, plan_dir = work / "model", work / "plan"
    if not (model_dir / "config.json").exists():
        init_model(model_dir, InitModelOptions(preset=args.preset, dtype="float32", seed=args.seed))
    export(model_dir, plan_dir, experts_per_function=5)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, 400) for _ in range(rng.randrange(3, 24))] for _ in range(args.prompts)]
    probes = reference_probes(model_dir, plan_dir, prompts, args.new_tokens)
    tallies = {"before": Tally(), "during": Tally(), "after": Tally()}
    load_before = os.getloadavg()
    started = time.monotonic()
    with platform_under_test(model_dir, plan_dir, work, TENANTS, threads=args.threads) as (gateway, server):
        traffic = Traffic(server.url, model_dir.name, TENANTS, probes)
        asyncio.run(soak(args, traffic, FaultInjector(gateway, tallies["during"], random.Random(args.seed)), tallies))
    report = {
        "duration_s": round(time.monotonic() - started, 1),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cores": os.cpu_count(),
        **{name: tally.summary() for name, tally in tallies.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    during = tallies["during"].summary()
    print(f"{during['requests']} requests in {args.duration:g} s with {sum(during['faults'].values())} faults "
          f"{during['faults']}: ok {during['ok']}, errors {during['error']} (5xx {during['5xx']}), wrong "
          f"{during['wrong']}, lost {during['lost']}, hung {during['hung']}")  # fmt: skip
    for name in ("before", "after"):
        tally = tallies[name].summary()
        print(f"{name}: {tally['ok']} of {tally['requests']} probes exact")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
