"""Loading checkpoints and plans: sharded checkpoints work; every broken input names its problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen2MoeConfig, Qwen2MoeModel
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from faasmoe.dispatch.executor import open_executor
from faasmoe.errors import CheckpointError, PlanError, ShardError
from faasmoe.model.checkpoint import EXPERT_KEY, INDEX_FILE, Checkpoint, moe_layers
from faasmoe.model.generate import generate
from faasmoe.model.presets import PRESETS
from faasmoe.model.sampling import SamplingParams
from faasmoe.model.split_model import SplitModel
from faasmoe.planning.digest import file_sha256
from faasmoe.planning.export import export
from faasmoe.planning.plan import ModelShape, Plan
from faasmoe.planning.stack import qwen15_shape
from tests.reference import load_reference, reference_greedy


def test_sharded_checkpoint_with_index_loads_and_matches(tiny_sharded, tmp_path):
    index = json.loads((tiny_sharded / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    export(tiny_sharded, tmp_path / "plan", 5)
    split = SplitModel.load(tiny_sharded, tmp_path / "plan", open_executor)
    prompt = [5, 17, 200, 3, 9]
    expected = reference_greedy(load_reference(tiny_sharded), [prompt], 8)
    assert generate(split.trunk, [prompt], SamplingParams(max_new_tokens=8)) == expected


def test_not_a_qwen2_moe_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="'llama'"):
        Checkpoint.open(tmp_path)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Checkpoint.open(tmp_path / "nowhere")


def test_missing_shard_is_named(tiny_sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sharded, broken)
    victim = sorted(set(json.loads((broken / INDEX_FILE).read_text())["weight_map"].values()))[-1]
    (broken / victim).unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim}"):
        Checkpoint.open(broken)


def test_no_weights_is_named(tiny_fp32, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_fp32 / "config.json", bare)
    with pytest.raises(CheckpointError, match="no weights"):
        Checkpoint.open(bare)


def test_plan_that_does_not_match_its_model(tiny_fp32, mixed_fp32, tmp_path):
    export(mixed_fp32, tmp_path / "plan", 4)
    with pytest.raises(PlanError, match="does not match model.*num_experts"):
        SplitModel.load(tiny_fp32, tmp_path / "plan", open_executor)
    with pytest.raises(PlanError, match="plan.json is missing"):
        Plan.load(tmp_path)


def test_shard_missing_an_expert_is_named(tiny_fp32, tmp_path):
    plan = export(tiny_fp32, tmp_path / "plan", 4)
    function = plan.functions[1]
    shard = tmp_path / "plan" / function.shard
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if ".experts.5." not in k}
        metadata = f.metadata()
    save_file(tensors, str(shard), metadata=metadata)
    function.sha256 = file_sha256(shard)  # the plan recorded this very file: its digest holds, its content does not
    plan.save(tmp_path / "plan")
    with pytest.raises(ShardError, match=f"{function.name}.*lacks expert 5 of layer 0"):
        SplitModel.load(tiny_fp32, tmp_path / "plan", open_executor)


def test_plan_groups_qwen_into_fifteen_functions_or_fewer():
    shape = qwen15_shape()
    plan = Plan.group(shape, experts_per_function=60, layers_per_function=2)
    assert len(plan.functions) == 12
    held = sorted(pair for f in plan.functions for pair in f.experts)
    assert held == [(layer, e) for layer in range(24) for e in range(60)]
    uneven = Plan.group(shape, experts_per_function=7)
    assert [len(f.experts) for f in uneven.functions[:9]] == [7] * 8 + [4]


def test_export_writes_hub_layout_and_sizes(tiny_fp32, tmp_path):
    plan = export(tiny_fp32, tmp_path / "plan", 5)
    function = plan.functions[0]
    with safe_open(str(tmp_path / "plan" / function.shard), framework="pt") as f:
        keys = sorted(f.keys())
    # [gate; up] in one tensor, as the maths reads it (shard format 2), and down.
    prefix = "model.layers.0.mlp.experts.0"
    assert keys[:2] == [f"{prefix}.down_proj.weight", f"{prefix}.gate_up_proj.weight"]
    assert len(keys) == 2 * len(function.experts)
    assert function.bytes > 0
    with safe_open(str(tmp_path / "plan" / plan.trunk), framework="pt") as f:
        assert not any(".mlp.experts." in k for k in f.keys())


def test_shape_of_a_checkpoint_is_the_shape_of_its_config(mixed_fp32):
    checkpoint = Checkpoint.open(mixed_fp32)
    shape = ModelShape.of(checkpoint)
    assert shape == ModelShape.from_config(checkpoint.config, checkpoint.dtype)
    assert shape.dtype == "float32"
    # small-mixed has a dense MLP in every other layer: the MoE layers are those holding routed experts.
    holding_experts = {int(m[1]) for key in checkpoint.key_to_file if (m := EXPERT_KEY.match(key))}
    assert shape.moe_layers == sorted(holding_experts) == [1]


@pytest.mark.parametrize("step, mlp_only", [(1, []), (2, []), (1, [0, 3]), (3, [2])])
def test_moe_layers_are_the_layers_transformers_builds_a_sparse_block_for(step: int, mlp_only: list[int]):
    config = Qwen2MoeConfig(**dict(PRESETS["tiny"], num_hidden_layers=6, decoder_sparse_step=step,
                                   mlp_only_layers=mlp_only))  # fmt: skip
    with torch.device("meta"):
        model = Qwen2MoeModel(config)
    sparse = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, Qwen2MoeSparseMoeBlock)]
    assert moe_layers(config) == sparse
    assert ModelShape.from_config(config).moe_layers == sparse


def test_plan_dir_is_self_contained(tiny_fp32, tmp_path: Path):
    plan = export(tiny_fp32, tmp_path / "plan", 6)
    again = Plan.load(tmp_path / "plan")
    assert again == plan
