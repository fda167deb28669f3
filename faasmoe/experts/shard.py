"""A function's weight shard: one safetensors file with its experts in the hub key layout.

The file's metadata says which (layer, expert) pairs it must hold, so a function needs nothing but
this one file, and a shard that lost an expert is caught when it is loaded. Given the plan's sha256 of
the file, loading also catches flipped bytes in tensor data, which the header cannot tell.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from faasmoe.errors import ShardError
from faasmoe.experts.compute import ExpertSet, ExpertWeights
from faasmoe.model.checkpoint import expert_key
from faasmoe.planning.digest import verify_sha256

FORMAT = "faasmoe-expert-shard/1"


def write_shard(
    path: Path, function: str, hidden_act: str, experts: dict[tuple[int, int], dict[str, torch.Tensor]]
) -> int:
    """Writes the experts (each given as its hub-layout tensors) and returns the file's tensor bytes."""
    tensors = {key: t.contiguous() for projections in experts.values() for key, t in projections.items()}
    metadata = {
        "format": FORMAT,
        "function": function,
        "hidden_act": hidden_act,
        "experts": json.dumps(sorted(experts)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return sum(t.nbytes for t in tensors.values())


def load_shard(path: Path, sha256: str | None = None) -> ExpertSet:
    """Loads every expert the shard declares; raises ShardError naming what is missing, corrupt or malformed.

    ``sha256`` is the plan's digest of the file; None (a version-1 plan) loads it unverified.
    """
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist")
    if sha256 is not None:
        verify_sha256(path, sha256, "shard")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise ShardError(f"shard {path} is not a safetensors file: {exc}") from exc
    with handle as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ShardError(f"shard {path} is not a faasmoe expert shard (format {meta.get('format')!r})")
        keys = set(f.keys())
        experts: dict[tuple[int, int], ExpertWeights] = {}
        for layer, expert in json.loads(meta["experts"]):
            names = [expert_key(layer, expert, p) for p in ("gate_proj", "up_proj", "down_proj")]
            if not all(n in keys for n in names):
                raise ShardError(f"shard {path} ({meta['function']}) lacks expert {expert} of layer {layer}")
            gate, up, down = (f.get_tensor(n) for n in names)
            experts[(layer, expert)] = ExpertWeights.from_projections(gate, up, down)
    if not experts:
        raise ShardError(f"shard {path} holds no experts")
    return ExpertSet(experts, hidden_act=meta["hidden_act"])

