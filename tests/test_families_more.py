"""olmoe and deepseek_v3 split exactly: the same checks as tests/test_families.py, against unmodified transformers.

The checkpoints are tiny random ones written by transformers' own classes in each family's hub layout
(per-expert ``mlp.experts.E.{gate,up,down}_proj``). deepseek's routers get a non-zero
``e_score_correction_bias`` (a fresh model's is zero), so that the bias takes part in choosing the experts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from faasmoe.model.checkpoint import Checkpoint, expert_key
from faasmoe.model.families import FAMILIES
from faasmoe.model.generate import generate
from faasmoe.model.init_model import InitModelOptions
from faasmoe.model.presets import preset_config
from faasmoe.model.sampling import SamplingParams
from faasmoe.planning.export import export
from faasmoe.planning.plan import ModelShape
from tests.conftest import _model
from tests.reference import load_reference, reference_greedy, reference_logits
from tests.test_families import NEW_TOKENS, split_through_gateway
from tests.test_split_exactness import check_bf16_split, check_fp32_split, prompts_for, split_model

CORRECTION_BIAS = ".mlp.gate.e_score_correction_bias"


@pytest.fixture(scope="session")
def olmoe_fp32(models_dir: Path) -> Path:
    return _model(models_dir, "olmoe-fp32", InitModelOptions(preset="olmoe-tiny", dtype="float32", seed=11))


@pytest.fixture(scope="session")
def olmoe_bf16(models_dir: Path) -> Path:
    return _model(models_dir, "olmoe-bf16", InitModelOptions(preset="olmoe-tiny", dtype="bfloat16", seed=12))


def _deepseek(models_dir: Path, name: str, preset: str, dtype: str, seed: int) -> Path:
    path = models_dir / name
    if not (path / "config.json").exists():
        _model(models_dir, name, InitModelOptions(preset=preset, dtype=dtype, seed=seed))
        weights = path / "model.safetensors"
        tensors = load_file(weights)
        g = torch.Generator().manual_seed(seed)
        for key in [k for k in tensors if k.endswith(CORRECTION_BIAS)]:  # about as wide as the sigmoid scores
            tensors[key] = (0.05 * torch.randn(tensors[key].shape, generator=g)).to(tensors[key].dtype)
        save_file(tensors, weights, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def deepseek_fp32(models_dir: Path) -> Path:
    return _deepseek(models_dir, "deepseek-fp32", "deepseek-tiny", "float32", seed=13)


@pytest.fixture(scope="session")
def deepseek_bf16(models_dir: Path) -> Path:
    return _deepseek(models_dir, "deepseek-bf16", "deepseek-tiny", "bfloat16", seed=14)


@pytest.fixture(scope="session")
def deepseek_v3_fp32(models_dir: Path) -> Path:
    return _deepseek(models_dir, "deepseek-v3-fp32", "deepseek-v3-tiny", "float32", seed=15)


# olmoe-tiny: 16 experts top-4, both layers MoE; deepseek-tiny: 16 experts in 4 groups, top-4 of the best 2
# groups, layer 0 dense and layers 1, 2 MoE. Per family: 1 expert per function, a count that does not divide
# the experts, all of them, 2 layers per function; deepseek-v3-tiny adds the low-rank query projection.
CASES = [
    ("olmoe_fp32", 1, 1),
    ("olmoe_fp32", 5, 1),
    ("olmoe_fp32", 16, 1),
    ("olmoe_fp32", 5, 2),
    ("deepseek_fp32", 1, 1),
    ("deepseek_fp32", 5, 1),
    ("deepseek_fp32", 16, 1),
    ("deepseek_fp32", 5, 2),
    ("deepseek_v3_fp32", 5, 2),
]


@pytest.mark.parametrize(("model", "experts_per_function", "layers_per_function"), CASES)
def test_fp32_logits_and_greedy_match_transformers(request, tmp_path, model, experts_per_function, layers_per_function):
    check_fp32_split(request.getfixturevalue(model), tmp_path / "plan", experts_per_function, layers_per_function)


@pytest.mark.parametrize(
    ("model", "experts_per_function"), [("olmoe_bf16", 1), ("olmoe_bf16", 16), ("deepseek_bf16", 5)]
)
def test_bf16_logits_bit_identical_and_greedy_tokens_identical(request, tmp_path, model, experts_per_function):
    check_bf16_split(request.getfixturevalue(model), tmp_path / "plan", experts_per_function)


@pytest.mark.parametrize("model", ["olmoe_fp32", "deepseek_fp32"])
def test_batched_decode_equals_each_sequence_alone(request, tmp_path, model):
    split = split_model(request.getfixturevalue(model), tmp_path / "plan", 5)
    prompts = prompts_for(split.vocab_size, [3, 10, 6], seed=2)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    together = generate(split.trunk, prompts, params)
    assert together == [generate(split.trunk, [p], params)[0] for p in prompts]


def test_deepseek_trunk_keeps_router_bias_shared_experts_and_dense_layer(deepseek_fp32, tmp_path):
    split = split_model(deepseek_fp32, tmp_path / "plan", 4)
    names = {name for name, _ in split.trunk.model.named_parameters()}
    assert not any(".mlp.experts." in name for name in names)
    assert {"model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.shared_experts.gate_proj.weight"} <= names
    assert split.plan.model.moe_layers == [1, 2]
    hub = Checkpoint.open(deepseek_fp32).read([f"model.layers.1{CORRECTION_BIAS}"])
    bias = split.trunk.moe_blocks[0].gate.e_score_correction_bias
    assert bias.abs().sum() > 0 and torch.equal(bias, hub[f"model.layers.1{CORRECTION_BIAS}"])
    assert not any(p.is_meta for p in split.trunk.model.parameters())


def test_deepseek_shards_hold_each_expert_of_the_hub_layout_and_the_trunk_the_rest(deepseek_fp32, tmp_path):
    plan = export(deepseek_fp32, tmp_path / "plan", 5, 2)
    function = plan.functions[1]
    hub = Checkpoint.open(deepseek_fp32)
    with safe_open(str(tmp_path / "plan" / function.shard), framework="pt") as shard:
        for layer, expert in function.experts:
            prefix = f"model.layers.{layer}.mlp.experts.{expert}"
            gate, up, down = hub.read([f"{prefix}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]).values()
            assert torch.equal(shard.get_tensor(expert_key(layer, expert, "gate_up_proj")), torch.cat([gate, up]))
            assert torch.equal(shard.get_tensor(expert_key(layer, expert, "down_proj")), down)
    with safe_open(str(tmp_path / "plan" / plan.trunk), framework="pt") as trunk:
        keys = set(trunk.keys())
    assert {f"model.layers.2{CORRECTION_BIAS}", "model.layers.2.mlp.shared_experts.down_proj.weight"} <= keys
    assert not any(".mlp.experts." in key for key in keys)


@pytest.mark.parametrize("first_dense", [0, 1, 3])
def test_deepseek_moe_layers_are_the_layers_transformers_builds_a_sparse_block_for(first_dense):
    config = preset_config("deepseek-tiny", layers=4)
    config.first_k_dense_replace = first_dense
    family = FAMILIES[config.model_type]
    with torch.device("meta"):
        model = family.causal_lm_class()(config)
    sparse = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, family.sparse_block_class())]
    assert ModelShape.from_config(config).moe_layers == sparse == list(range(first_dense, 4))


# Published totals: OLMoE-1B-7B "6.9B total" (OLMoE paper); Moonlight-16B-A3B 15.29B without the embedding and the
# LM head (Moonlight paper's table; "16B" on the model card).
@pytest.mark.parametrize(
    "preset, counted, billions, experts, top_k, expert_size, moe_layers, moe_layers_of_two",
    [
        ("olmoe-1b-7b", "all", 6.9, 64, 8, 1024, list(range(16)), [0, 1]),
        ("moonlight-16b-a3b", "non-embedding", 15.29, 64, 6, 1408, list(range(1, 27)), [1]),
    ],
)
def test_real_presets_have_the_published_shapes(
    preset, counted, billions, experts, top_k, expert_size, moe_layers, moe_layers_of_two
):
    config = preset_config(preset)
    with torch.device("meta"):
        model = FAMILIES[config.model_type].causal_lm_class()(config)
    total = sum(p.numel() for p in model.parameters())
    if counted == "non-embedding":
        total -= model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    assert round(total / 1e9, len(str(billions).split(".")[1])) == billions
    shape = ModelShape.from_config(config)
    assert (shape.num_experts, shape.num_experts_per_tok, shape.moe_intermediate_size) == (experts, top_k, expert_size)
    assert shape.moe_layers == moe_layers
    assert ModelShape.from_config(preset_config(preset, layers=2)).moe_layers == moe_layers_of_two


# The config.json fields of allenai/OLMoE-1B-7B-0924 and moonshotai/Moonlight-16B-A3B that shape routing and attention.
PUBLISHED_FIELDS = {
    "olmoe-1b-7b": dict(
        vocab_size=50304, num_attention_heads=16, num_key_value_heads=16, norm_topk_prob=False, clip_qkv=None
    ),
    "moonlight-16b-a3b": dict(
        vocab_size=163840, n_shared_experts=2, n_group=1, topk_group=1, routed_scaling_factor=2.446,
        norm_topk_prob=True, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, num_attention_heads=16, num_key_value_heads=16,
    ),
}  # fmt: skip


@pytest.mark.parametrize("preset", PUBLISHED_FIELDS)
def test_presets_route_and_attend_as_published(preset):
    config = preset_config(preset)
    published = PUBLISHED_FIELDS[preset]
    assert {field: getattr(config, field) for field in published} == published


def test_deepseek_bf16_bit_identical_through_the_embedded_gateway(deepseek_bf16, tmp_path):
    # deepseek's router gives float32 weights (scaled by routed_scaling_factor): they go on the wire so.
    reference = load_reference(deepseek_bf16)
    (prompt,) = prompts_for(reference.config.vocab_size, [9])
    with split_through_gateway(deepseek_bf16, tmp_path / "plan", 5, layers_per_function=2) as split:
        (ours,) = split.trunk.step([split.trunk.new_sequence(prompt)], all_logits=True)
        assert torch.equal(ours, reference_logits(reference, [prompt])[0])
        expected = reference_greedy(reference, [prompt], NEW_TOKENS)
        assert generate(split.trunk, [prompt], SamplingParams(max_new_tokens=NEW_TOKENS)) == expected
