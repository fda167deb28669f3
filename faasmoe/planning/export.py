"""`faasmoe export`: a checkpoint -> plan.json, one expert shard per function, and the trunk weights.

plan.json records each file's sha256, hashed from the file as written, so a loader can tell a corrupt copy.
Every file is written beside its name and renamed over it, so re-exporting into a plan directory that
running replicas map leaves their files intact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from faasmoe.experts.shard import save_file_atomically, write_shard
from faasmoe.model.checkpoint import Checkpoint
from faasmoe.planning.digest import file_sha256
from faasmoe.planning.grouping import Grouping
from faasmoe.planning.plan import DEFAULT_PREFIX, ModelShape, Plan


def export(
    model_dir: Path,
    out_dir: Path,
    experts_per_function: int,
    layers_per_function: int = 1,
    prefix: str = DEFAULT_PREFIX,
    on_function: Callable[[str], None] | None = None,
    grouping: Grouping = Grouping.CONTIGUOUS,
    popularity: torch.Tensor | None = None,
) -> Plan:
    """Writes the plan directory; reads one function's experts at a time so memory stays small.

    ``popularity`` [MoE layers, E] orders the experts for ``Grouping.POPULARITY`` (grouping.py)."""
    checkpoint = Checkpoint.open(model_dir)
    plan = Plan.group(
        ModelShape.of(checkpoint), experts_per_function, layers_per_function, prefix, grouping, popularity
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file_atomically(checkpoint.read(checkpoint.trunk_keys()), out_dir / plan.trunk, {"format": "pt"})
    plan.trunk_sha256 = file_sha256(out_dir / plan.trunk)
    for function in plan.functions:
        experts = {(layer, e): checkpoint.read_expert(layer, e) for layer, e in function.experts}
        function.bytes = write_shard(out_dir / function.shard, function.name, checkpoint.expert_mlp, experts)
        function.sha256 = file_sha256(out_dir / function.shard)
        if on_function:
            on_function(function.name)
    plan.save(out_dir)
    return plan
