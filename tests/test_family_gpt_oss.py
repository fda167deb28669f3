"""gpt_oss splits exactly: the checks of tests/test_families.py, against unmodified transformers.

Its experts are fused per layer with biases (``mlp.experts.gate_up_proj`` [E, H, 2I], gate and up in alternate
columns, ``down_proj`` [E, I, H]) and use a clamped SwiGLU; its attention has a learnt sink per head and a
sliding window on every other layer. The tiny checkpoints are written by transformers' own class
(init-model), then given non-zero expert biases (a fresh model's are zero) and a SwiGLU limit and alpha that
clamp about a sixth of the values (7.0 would clamp none of a tiny model's), so that all of it takes part.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GptOssConfig, Mxfp4Config, PreTrainedModel
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssTopKRouter

from faasmoe.errors import CheckpointError
from faasmoe.experts.compute import ClampedSwigluMlp, ExpertBatch, ExpertSet, ExpertWeights
from faasmoe.model.checkpoint import SINGLE_FILE, Checkpoint, expert_key
from faasmoe.model.families import FAMILIES
from faasmoe.model.generate import generate
from faasmoe.model.init_model import InitModelOptions
from faasmoe.model.presets import preset_config
from faasmoe.model.sampling import SamplingParams
from faasmoe.planning.export import export
from faasmoe.planning.plan import ModelShape
from tests.conftest import _model
from tests.reference import load_reference, reference_greedy, reference_logits
from tests.test_families import FP32_TOLERANCE, NEW_TOKENS, split_through_gateway
from tests.test_split_exactness import check_bf16_split, check_fp32_split, prompts_for, split_logits, split_model

SWIGLU = {"swiglu_alpha": 1.5, "swiglu_limit": 0.25}
WINDOW = preset_config("gpt-oss-tiny").sliding_window  # 6: the prompts below are longer, and decode goes past it
MXFP4_CONFIG = {  # as openai/gpt-oss-20b's config.json: only the routed experts are quantized
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
}  # fmt: skip
SLIDING, FULL = "sliding_attention", "full_attention"
YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 4096}  # fmt: skip


def _gpt_oss(models_dir: Path, name: str, dtype: str, seed: int) -> Path:
    path = models_dir / name
    if not (path / "config.json").exists():
        _model(models_dir, name, InitModelOptions(preset="gpt-oss-tiny", dtype=dtype, seed=seed))
        tensors = load_file(path / SINGLE_FILE)
        g = torch.Generator().manual_seed(seed)
        for key in [k for k in tensors if k.endswith("_proj_bias")]:  # about as wide as the projections
            tensors[key] = (0.1 * torch.randn(tensors[key].shape, generator=g)).to(tensors[key].dtype)
        save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(config | SWIGLU))
    return path


@pytest.fixture(scope="session")
def gpt_oss_fp32(models_dir: Path) -> Path:
    return _gpt_oss(models_dir, "gpt-oss-fp32", "float32", seed=21)


@pytest.fixture(scope="session")
def gpt_oss_bf16(models_dir: Path) -> Path:
    return _gpt_oss(models_dir, "gpt-oss-bf16", "bfloat16", seed=22)


@pytest.fixture(scope="session")
def gpt_oss_mxfp4(models_dir: Path, gpt_oss_bf16: Path) -> Path:
    """gpt_oss_bf16 with its experts as the hub ships them: MXFP4 blocks of 32 values (16 bytes) and a scale
    per block, here random with scales near 2^-7, so that values are about as wide as the bf16 experts'."""
    path = models_dir / "gpt-oss-mxfp4"
    if not (path / "config.json").exists():
        shutil.copytree(gpt_oss_bf16, path)
        tensors = load_file(path / SINGLE_FILE)
        g = torch.Generator().manual_seed(23)
        for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            experts, inputs, outputs = tensors.pop(key).shape  # [E, in, out]; MXFP4 stores [E, out, in / 32, 16]
            blocks, scales = (experts, outputs, inputs // 32, 16), (experts, outputs, inputs // 32)
            tensors[f"{key}_blocks"] = torch.randint(0, 256, blocks, dtype=torch.uint8, generator=g)
            tensors[f"{key}_scales"] = torch.randint(119, 123, scales, dtype=torch.uint8, generator=g)
        save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(config | {"quantization_config": MXFP4_CONFIG}))
    return path


def load_mxfp4_reference(model_dir: Path) -> PreTrainedModel:
    """transformers' own dequantized model: what it loads the hub's gpt-oss as on a CPU."""
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=Mxfp4Config(dequantize=True)).eval()


# 8 experts top-4, both layers MoE (layer 0 sliding-window, layer 1 full): 1 expert per function, a count that
# does not divide the experts, all of them, 2 layers per function.
@pytest.mark.parametrize(("experts_per_function", "layers_per_function"), [(1, 1), (3, 1), (8, 1), (3, 2)])
def test_fp32_logits_and_greedy_match_transformers(gpt_oss_fp32, tmp_path, experts_per_function, layers_per_function):
    check_fp32_split(gpt_oss_fp32, tmp_path / "plan", experts_per_function, layers_per_function)


@pytest.mark.parametrize("experts_per_function", [1, 3])
def test_bf16_logits_bit_identical_and_greedy_tokens_identical(gpt_oss_bf16, tmp_path, experts_per_function):
    check_bf16_split(gpt_oss_bf16, tmp_path / "plan", experts_per_function)


def test_batched_decode_equals_each_sequence_alone(gpt_oss_fp32, tmp_path):
    split = split_model(gpt_oss_fp32, tmp_path / "plan", 3)
    prompts = prompts_for(split.vocab_size, [3, 10, 6], seed=2)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    assert generate(split.trunk, prompts, params) == [generate(split.trunk, [p], params)[0] for p in prompts]


def test_expert_maths_is_gpt_oss_experts_bit_for_bit():
    """compute.py's ClampedSwigluMlp against GptOssExperts as transformers runs it (its default experts
    implementation), in bf16, at the real SwiGLU constants with values past the limit; split over two sets."""
    config = preset_config("gpt-oss-tiny")
    config._experts_implementation = "grouped_mm"  # what from_pretrained picks
    torch.manual_seed(0)
    experts, router = GptOssExperts(config), GptOssTopKRouter(config)
    for p in (*experts.parameters(), *router.parameters()):
        torch.nn.init.normal_(p)  # gate_up values of about +-8 (H = 64): the 7.0 clamp takes part
    experts, router = experts.to(torch.bfloat16), router.to(torch.bfloat16)
    hidden = torch.randn(37, config.hidden_size, dtype=torch.bfloat16)
    _, weights, expert_ids = router(hidden)  # [T, K] each, bf16 weights
    assert ((hidden @ experts.gate_up_proj[0]).abs() > config.swiglu_limit).float().mean() > 0.2
    with torch.no_grad():
        theirs = experts(hidden, expert_ids, weights)

    def expert_set(owned: range) -> ExpertSet:
        e = experts
        held = {(0, i): ExpertWeights(e.gate_up_proj[i], e.down_proj[i], e.gate_up_proj_bias[i], e.down_proj_bias[i])
                for i in owned}  # fmt: skip
        return ExpertSet(held, FAMILIES["gpt_oss"].expert_mlp(config))

    def asked(owned: range) -> ExpertBatch:
        ids = torch.where(torch.isin(expert_ids, torch.tensor(owned)), expert_ids, -1)
        return ExpertBatch(hidden, torch.zeros(len(hidden), dtype=torch.int64), ids, weights)

    whole = expert_set(range(8)).partial_sum(asked(range(8)))
    halves = [expert_set(r).partial_sum(asked(r)) for r in (range(3), range(3, 8))]
    assert torch.equal(whole.to(torch.bfloat16), theirs)
    assert torch.equal((halves[0] + halves[1]).to(torch.bfloat16), theirs)
    assert expert_set(range(8)).mlp == ClampedSwigluMlp(alpha=1.702, limit=7.0)


def test_shards_hold_the_hub_layout_with_biases_and_the_trunk_the_router_and_sinks(gpt_oss_fp32, tmp_path):
    plan = export(gpt_oss_fp32, tmp_path / "plan", 3)
    function = plan.functions[1]
    hub = load_file(gpt_oss_fp32 / SINGLE_FILE)
    with safe_open(str(tmp_path / "plan" / function.shard), framework="pt") as shard:
        assert json.loads(shard.metadata()["mlp"]) == {"kind": "clamped_swiglu", "alpha": 1.5, "limit": 0.25}
        for layer, expert in function.experts:
            for name in ("gate_up_proj", "down_proj"):
                fused = f"model.layers.{layer}.mlp.experts.{name}"
                weight = expert_key(layer, expert, name)
                assert torch.equal(shard.get_tensor(weight), hub[fused][expert])  # [H, 2I] interleaved; [I, H]
                assert torch.equal(shard.get_tensor(weight.replace(".weight", ".bias")), hub[f"{fused}_bias"][expert])
    with safe_open(str(tmp_path / "plan" / plan.trunk), framework="pt") as trunk:
        assert {"model.layers.0.mlp.router.bias", "model.layers.0.self_attn.sinks"} <= set(trunk.keys())
        assert not any(".experts." in key for key in trunk.keys())

    split = split_model(gpt_oss_fp32, tmp_path / "plan", 3)
    names = {name for name, _ in split.trunk.model.named_parameters()}
    assert not any(".experts." in name for name in names)
    assert {"model.layers.1.mlp.gate.bias", "model.layers.1.self_attn.sinks"} <= names  # the router, as SplitMoeBlock's
    assert split.trunk.layer_kinds == [SLIDING, FULL]


def test_bf16_bit_identical_through_the_embedded_gateway(gpt_oss_bf16, tmp_path):
    # the functions read the clamped SwiGLU and its constants from their shards' metadata
    reference = load_reference(gpt_oss_bf16)
    prompts = prompts_for(reference.config.vocab_size, [9, 13])
    with split_through_gateway(gpt_oss_bf16, tmp_path / "plan", 3, layers_per_function=2) as split:
        for prompt in prompts:
            (ours,) = split.trunk.step([split.trunk.new_sequence(prompt)], all_logits=True)
            assert torch.equal(ours, reference_logits(reference, [prompt])[0])
        expected = reference_greedy(reference, prompts, NEW_TOKENS)
        assert generate(split.trunk, prompts, SamplingParams(max_new_tokens=NEW_TOKENS)) == expected


def test_mxfp4_experts_are_dequantized_as_transformers_does(gpt_oss_mxfp4, tmp_path):
    reference = load_mxfp4_reference(gpt_oss_mxfp4)
    split = split_model(gpt_oss_mxfp4, tmp_path / "plan", 3)
    for function in split.plan.functions:
        with safe_open(str(tmp_path / "plan" / function.shard), framework="pt") as shard:
            for layer, expert in function.experts:
                theirs = reference.model.layers[layer].mlp.experts
                for name in ("gate_up_proj", "down_proj"):
                    assert torch.equal(shard.get_tensor(expert_key(layer, expert, name)), getattr(theirs, name)[expert])
    (prompt,) = prompts_for(split.vocab_size, [11], seed=3)
    (ours,) = split_logits(split, [prompt])
    assert torch.equal(ours, reference_logits(reference, [prompt])[0])
    expected = reference_greedy(reference, [prompt], NEW_TOKENS)
    assert generate(split.trunk, [prompt], SamplingParams(max_new_tokens=NEW_TOKENS)) == expected


def test_other_quantized_weights_are_refused_naming_the_method(gpt_oss_fp32, tmp_path):
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    config = json.loads((gpt_oss_fp32 / "config.json").read_text())
    (fp8 / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(CheckpointError, match=r"fp8 quantized weights are not supported \(faasmoe dequantizes"):
        Checkpoint.open(fp8)


@pytest.mark.parametrize("model", ["mixtral_fp32", "tiny_fp32"])
def test_other_families_sliding_window_is_served_exactly(request, tmp_path, model):
    """The trunk's per-layer masks serve any family's window: mixtral's on every layer, qwen2_moe's on the layers
    its layer_types name (here layer 0 of 2), both by sliding_window = 4 < the prompts."""
    windowed = tmp_path / "windowed"
    shutil.copytree(request.getfixturevalue(model), windowed)
    config = json.loads((windowed / "config.json").read_text()) | {"sliding_window": 4}
    if config["model_type"] == "qwen2_moe":
        config |= {"use_sliding_window": True, "layer_types": [SLIDING, FULL]}
    (windowed / "config.json").write_text(json.dumps(config))
    reference = load_reference(windowed)
    split = split_model(windowed, tmp_path / "plan", 3)
    prompts = prompts_for(split.vocab_size, [9, 3, 6])
    for ours, theirs in zip(split_logits(split, prompts), reference_logits(reference, prompts), strict=True):
        assert (ours - theirs).abs().max().item() <= FP32_TOLERANCE
    expected = reference_greedy(reference, prompts, NEW_TOKENS)
    assert generate(split.trunk, prompts, SamplingParams(max_new_tokens=NEW_TOKENS)) == expected


def test_gpt_oss_20b_preset_has_the_published_shapes():
    config, defaults = preset_config("gpt-oss-20b"), GptOssConfig()  # the defaults are gpt-oss-120b's
    shared = ["vocab_size", "hidden_size", "intermediate_size", "head_dim", "num_attention_heads",
              "num_key_value_heads", "num_experts_per_tok", "sliding_window", "swiglu_alpha", "swiglu_limit",
              "rms_norm_eps", "max_position_embeddings", "attention_bias", "rope_parameters"]  # fmt: skip
    assert {f: getattr(config, f) for f in shared} == {f: getattr(defaults, f) for f in shared}
    assert (config.num_hidden_layers, config.num_local_experts) == (24, 32)  # 120b: 36 layers of 128 experts
    assert config.layer_types == [SLIDING, FULL] * 12
    assert config.rope_parameters == YARN
    with torch.device("meta"):
        model = FAMILIES["gpt_oss"].causal_lm_class()(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 20.91  # OpenAI's model card: 20.91B
    shape = ModelShape.from_config(config)
    assert (shape.num_experts, shape.num_experts_per_tok, shape.moe_intermediate_size) == (32, 4, 2880)
    assert shape.moe_layers == list(range(24))
    assert preset_config("gpt-oss-20b", layers=3).layer_types == [SLIDING, FULL, SLIDING]
    tiny = preset_config("gpt-oss-tiny")
    assert (tiny.layer_types, tiny.rope_parameters, tiny.num_experts_per_tok) == ([SLIDING, FULL], YARN, 4)
