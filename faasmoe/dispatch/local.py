"""The in-process transport: every function's shard loaded here, computed in the calling thread.

The shards are mapped, not copied (faasmoe.experts.shard), so each weight is held once: as the file's
pages, which the process's PSS counts as the forward passes touch them.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import torch

from faasmoe.dispatch.scatter import FunctionCall
from faasmoe.errors import ShardError
from faasmoe.experts.compute import ExpertSet
from faasmoe.experts.shard import load_shard
from faasmoe.planning.plan import FunctionSpec, Plan


class LocalTransport:
    def __init__(self, plan: Plan, plan_dir: Path) -> None:
        self.sets = {f.name: _load_function(plan_dir, f) for f in plan.functions}

    def send(self, calls: list[FunctionCall]) -> Future[list[torch.Tensor]]:
        future: Future = Future()
        future.set_result([self.sets[call.function.name].partial_sum(call.batch) for call in calls])
        return future

    def close(self) -> None:
        """Nothing to release: the weights go with the object."""


def _load_function(plan_dir: Path, function: FunctionSpec) -> ExpertSet:
    experts = load_shard(plan_dir / function.shard, function.sha256)
    for layer, expert in function.experts:
        if (layer, expert) not in experts:
            raise ShardError(f"shard of {function.name} lacks expert {expert} of layer {layer}")
    return experts
