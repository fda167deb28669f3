"""A local Hugging Face checkpoint directory of a supported MoE family: config and lazily read tensors."""

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
from faasmoe.experts.compute import ExpertMlp, ExpertWeights
from faasmoe.model.families import EXPERT_PROJECTIONS, FAMILIES, MoeFamily, unsupported

if TYPE_CHECKING:  # transformers costs ~1.5 s to import; expert functions only need expert_key
    from transformers import PretrainedConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# gpt_oss on the hub: its experts in MXFP4 (<projection>_blocks, _scales), dequantized on reading
MXFP4 = "mxfp4"

# faasmoe's names of one routed expert's tensors (qwen2_moe's hub layout, and the shards' for every family),
# e.g. model.layers.3.mlp.experts.17.up_proj.weight
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def expert_key(layer: int, expert: int, projection: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"


def moe_layers(config: PretrainedConfig) -> list[int]:
    """The layers with routed experts, by the family's rule (transformers' decoder layer); the others are dense."""
    return FAMILIES[config.model_type].moe_layers(config)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory: its config and where each tensor lives. Tensors are read on demand."""

    path: Path
    config: PretrainedConfig
    key_to_file: dict[str, Path]

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path} is not a model directory: config.json is missing")
        declared = json.loads(config_file.read_text())
        if declared.get("model_type") not in FAMILIES:
            raise CheckpointError(f"{path}: {unsupported(declared)}")
        quantized = (declared.get("quantization_config") or {}).get("quant_method")
        if quantized is not None and (quantized, declared["model_type"]) != (MXFP4, "gpt_oss"):
            raise CheckpointError(f"{path}: {quantized} quantized weights are not supported "
                                  f"(faasmoe dequantizes gpt_oss's {MXFP4} experts only)")  # fmt: skip
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        return cls(path=path, config=config, key_to_file=_index_tensors(path))

    @property
    def family(self) -> MoeFamily:
        return FAMILIES[self.config.model_type]

    @property
    def dtype(self) -> torch.dtype:
        return self.config.dtype or torch.float32

    def trunk_keys(self) -> list[str]:
        """The hub keys of every tensor but the routed experts'."""
        return [k for k in self.key_to_file if not self.family.is_routed_expert_key(k)]

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

    @property
    def expert_mlp(self) -> ExpertMlp:
        return self.family.expert_mlp(self.config)

    def read_expert(self, layer: int, expert: int) -> ExpertWeights:
        """One expert in the layout of the family's expert_mlp, whatever the family's hub names."""
        if self.family.fused_experts:
            return self._read_fused_expert(layer, expert)
        hub_keys = [self.family.expert_key(layer, expert, p) for p in EXPERT_PROJECTIONS]
        self._check_expert(layer, expert, hub_keys)
        tensors = self.read(hub_keys)
        return ExpertWeights.from_projections(*(tensors[k] for k in hub_keys))

    def _read_fused_expert(self, layer: int, expert: int) -> ExpertWeights:
        """Expert ``expert``'s rows of the layer's fused tensors (reading only those), MXFP4 ones dequantized
        by transformers' own code into the dtype of the biases beside them (the hub's bf16, as the trunk)."""
        mxfp4 = (getattr(self.config, "quantization_config", None) or {}).get("quant_method") == MXFP4
        packed = ("_blocks", "_scales") if mxfp4 else ("",)
        names = [f"{p}{part}" for p in ("gate_up_proj", "down_proj") for part in (*packed, "_bias")]
        hub_keys = [self.family.fused_expert_key(layer, name) for name in names]
        self._check_expert(layer, expert, hub_keys)
        t = {name: self._read_row(key, expert) for name, key in zip(names, hub_keys, strict=True)}
        if mxfp4:
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors

            for p in ("gate_up_proj", "down_proj"):
                blocks, scales = t.pop(f"{p}_blocks")[None], t.pop(f"{p}_scales")[None]  # of one expert: [1, ...]
                t[p] = convert_moe_packed_tensors(blocks, scales, dtype=t[f"{p}_bias"].dtype)[0]
        return ExpertWeights(t["gate_up_proj"], t["down_proj"], t["gate_up_proj_bias"], t["down_proj_bias"])

    def _check_expert(self, layer: int, expert: int, hub_keys: list[str]) -> None:
        missing = [k for k in hub_keys if k not in self.key_to_file]
        if missing:
            raise CheckpointError(f"{self.path}: expert {expert} of layer {layer} is missing ({missing[0]})")

    def _read_row(self, key: str, row: int) -> torch.Tensor:
        """Row ``row`` of a tensor's first dimension, reading only its bytes."""
        with safe_open(self.key_to_file[key], framework="pt") as f:
            return f.get_slice(key)[row]


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
