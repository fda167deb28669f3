"""A function's weight shard: one safetensors file holding its experts in the layout the maths reads.

Format 3 (``FORMAT``) stores each expert as compute.py's ExpertMlp, which the metadata names (``mlp``),
reads it: ``...experts.E.gate_up_proj.weight`` and ``down_proj.weight`` ([2I, H] and [H, I] for
GatedMlp; gpt_oss's own [H, 2I] and [I, H] for ClampedSwigluMlp, with ``gate_up_proj.bias`` and
``down_proj.bias``). Format 2 (``FORMAT_GATED``, before gpt_oss) is format 3 with a GatedMlp named by
its ``hidden_act`` alone; it still loads, as a view too. Loading copies nothing: the
tensors view safetensors' mapping of the file (private: a write would copy its page, and nothing
writes), whose pages are the page cache's, shared by every process that maps the shard. A cold start
therefore reads no weights when the shard is in the page cache; a replica's PSS counts the pages it touches.
Format 1 (``FORMAT_PROJECTIONS``, written by faasmoe before plan version 3) keeps gate, up and down
apart in the hub layout; it still loads, into copies ([gate; up] has to be concatenated anyway).

The file's metadata says which (layer, expert) pairs it must hold, so a function needs nothing but
this one file, and a shard that lost an expert is caught when it is loaded. Given the plan's sha256 of
the file, loading also catches flipped bytes in tensor data, which the header cannot tell.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from faasmoe.errors import ShardError
from faasmoe.experts.compute import ClampedSwigluMlp, ExpertMlp, ExpertSet, ExpertWeights, GatedMlp
from faasmoe.files import atomic_path
from faasmoe.model.checkpoint import EXPERT_PROJECTIONS, expert_key
from faasmoe.planning.digest import DigestCheck, verify_file

FORMAT = "faasmoe-expert-shard/3"
FORMAT_GATED = "faasmoe-expert-shard/2"
FORMAT_PROJECTIONS = "faasmoe-expert-shard/1"
GATE_UP = "gate_up_proj"
DOWN = "down_proj"
MLPS: dict[str, type[ExpertMlp]] = {mlp.kind: mlp for mlp in (GatedMlp, ClampedSwigluMlp)}


def write_shard(path: Path, function: str, mlp: ExpertMlp, experts: dict[tuple[int, int], ExpertWeights]) -> int:
    """Writes the experts (each in ``mlp``'s layout) in format 3; returns the file's tensor bytes.

    The file is written beside ``path`` and renamed over it: a replica mapping the previous file keeps
    its pages (truncating a mapped file would kill it with SIGBUS on its next access).
    """
    tensors: dict[str, torch.Tensor] = {}
    for (layer, expert), weights in experts.items():
        for field, name in _tensor_names(layer, expert).items():
            if (tensor := getattr(weights, field)) is not None:
                tensors[name] = tensor.contiguous()
    metadata = {
        "format": FORMAT,
        "function": function,
        "mlp": json.dumps({"kind": mlp.kind, **dataclasses.asdict(mlp)}),
        "experts": json.dumps(sorted(experts)),
    }
    save_file_atomically(tensors, path, metadata)
    return sum(t.nbytes for t in tensors.values())


def save_file_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, into a new file renamed over ``path`` (so a reader never sees it half written)."""
    with atomic_path(path) as partial:
        save_file(tensors, str(partial), metadata=metadata)


class ShardFile:
    """An open shard: verify it, then read its experts from the very file verified (not the path again)."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise ShardError(f"shard {path} does not exist")
        self.path = path
        self.file: BinaryIO = path.open("rb")

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.file.close()  # the tensors keep safetensors' mapping, which does not need the descriptor

    def verify(self, sha256: str | None) -> DigestCheck:
        """Checks the file against the plan's digest (hashing it only if this file was not hashed before);
        None (a version-1 plan) leaves it unverified."""
        return DigestCheck.UNVERIFIED if sha256 is None else verify_file(self.file, self.path, sha256, "shard")

    def experts(self) -> ExpertSet:
        """Every expert the shard declares; raises ShardError naming what is missing or malformed."""
        try:
            handle = safe_open(self._reopenable(), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for a corrupt header
            raise ShardError(f"shard {self.path} is not a safetensors file: {exc}") from exc
        with handle as f:
            meta = f.metadata() or {}
            shard_format = meta.get("format")
            if shard_format not in (FORMAT, FORMAT_GATED, FORMAT_PROJECTIONS):
                raise ShardError(f"shard {self.path} is not a faasmoe expert shard (format {shard_format!r})")
            mlp = self._mlp(meta)
            fused = shard_format != FORMAT_PROJECTIONS
            keys = set(f.keys())
            experts: dict[tuple[int, int], ExpertWeights] = {}
            for layer, expert in json.loads(meta["experts"]):
                if fused:
                    names = _tensor_names(layer, expert, biases=mlp.has_bias)
                else:
                    names = {p: expert_key(layer, expert, p) for p in EXPERT_PROJECTIONS}
                if not all(n in keys for n in names.values()):
                    raise ShardError(f"shard {self.path} ({meta['function']}) lacks expert {expert} of layer {layer}")
                tensors = {field: f.get_tensor(n) for field, n in names.items()}
                experts[(layer, expert)] = ExpertWeights(**tensors) if fused else _copied(*tensors.values())
        if not experts:
            raise ShardError(f"shard {self.path} holds no experts")
        return ExpertSet(experts, mlp)

    def _mlp(self, meta: dict[str, str]) -> ExpertMlp:
        """The experts' maths the metadata names; shards before format 3 name a GatedMlp's activation only."""
        if "mlp" not in meta:
            return GatedMlp(meta["hidden_act"])
        spec = json.loads(meta["mlp"])
        kind = spec.pop("kind")
        if kind not in MLPS:
            raise ShardError(f"shard {self.path} holds experts of an unknown kind {kind!r}; known: {', '.join(MLPS)}")
        return MLPS[kind](**spec)

    def _reopenable(self) -> str:
        """A name of the open file for safetensors, which takes names only: /dev/fd/N where there is one."""
        fd_path = f"/dev/fd/{self.file.fileno()}"
        return fd_path if os.path.exists(fd_path) else str(self.path)


def _tensor_names(layer: int, expert: int, biases: bool = True) -> dict[str, str]:
    """An expert's ExpertWeights fields by the names of their tensors in a shard (format 2 and 3)."""
    weights = {"gate_up": expert_key(layer, expert, GATE_UP), "down": expert_key(layer, expert, DOWN)}
    if not biases:
        return weights
    return weights | {f"{field}_bias": name.removesuffix(".weight") + ".bias" for field, name in weights.items()}


def _copied(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> ExpertWeights:
    """A format-1 expert held once, in memory: [gate; up] is a copy already, and copying ``down`` too lets
    the mapping go (a view kept it, and with it every page of the file that the concatenation read)."""
    return ExpertWeights.from_projections(gate, up, down.clone())


def load_shard(path: Path, sha256: str | None = None) -> ExpertSet:
    """Verifies and loads the shard; raises ShardError naming what is missing, corrupt or malformed.

    ``sha256`` is the plan's digest of the file; None (a version-1 plan) loads it unverified.
    """
    with ShardFile(path) as shard:
        shard.verify(sha256)
        return shard.experts()
