"""A local Hugging Face checkpoint directory of architecture qwen2_moe: config and lazily read tensors."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from faasmoe.errors import CheckpointError

if TYPE_CHECKING:  # transformers costs ~1.5 s to import; expert functions only need expert_key
    from transformers import Qwen2MoeConfig

SUPPORTED_MODEL_TYPE = "qwen2_moe"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Hub layout of one routed expert's weights, e.g. model.layers.3.mlp.experts.17.up_proj.weight
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def expert_key(layer: int, expert: int, projection: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"


def is_routed_expert_key(key: str) -> bool:
    return ".mlp.experts." in key


def moe_layers(config: Qwen2MoeConfig) -> list[int]:
    """The layers with routed experts, by transformers' Qwen2MoeDecoderLayer rule: every
    decoder_sparse_step-th layer that mlp_only_layers does not list; the others have a dense MLP."""
    c = config
    return [
        i
        for i in range(c.num_hidden_layers)
        if i not in c.mlp_only_layers and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0
    ]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory: its config and where each tensor lives. Tensors are read on demand."""

    path: Path
    config: Qwen2MoeConfig
    key_to_file: dict[str, Path]

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path} is not a model directory: config.json is missing")
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type != SUPPORTED_MODEL_TYPE:
            raise CheckpointError(
                f"{path} holds a {model_type!r} model; faasmoe serves {SUPPORTED_MODEL_TYPE!r} checkpoints"
            )
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        return cls(path=path, config=config, key_to_file=_index_tensors(path))

    @property
    def dtype(self) -> torch.dtype:
        return self.config.dtype or torch.float32

    def trunk_keys(self) -> list[str]:
        return [k for k in self.key_to_file if not is_routed_expert_key(k)]

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Reads the named tensors (copies into memory), opening each file once."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            if key not in self.key_to_file:
                raise CheckpointError(f"{self.path}: tensor {key!r} is not in the checkpoint")
            by_file.setdefault(self.key_to_file[key], []).append(key)
        tensors: dict[str, torch.Tensor] = {}
        for file, file_keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                for key in file_keys:
                    tensors[key] = f.get_tensor(key)
        return tensors

    def read_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        keys = [expert_key(layer, expert, p) for p in EXPERT_PROJECTIONS]
        missing = [k for k in keys if k not in self.key_to_file]
        if missing:
            raise CheckpointError(f"{self.path}: expert {expert} of layer {layer} is missing ({missing[0]})")
        return self.read(keys)


def _index_tensors(path: Path) -> dict[str, Path]:
    index = path / INDEX_FILE
    single = path / SINGLE_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        for name in sorted(set(weight_map.values())):
            if not (path / name).is_file():
                raise CheckpointError(f"{path}: shard {name} named in {INDEX_FILE} is missing")
        return {key: path / name for key, name in weight_map.items()}
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {key: single for key in f.keys()}
    raise CheckpointError(f"{path}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})")
