"""Every supported MoE family splits exactly: qwen3_moe and mixtral against unmodified transformers.

qwen2_moe's own cases are tests/test_split_exactness.py; these run the same checks on the other families'
tiny checkpoints, written by transformers' own classes in each family's hub layout (tests/conftest.py).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from faasmoe.cli import app
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.model.checkpoint import Checkpoint, expert_key
from faasmoe.model.families import FAMILIES
from faasmoe.model.generate import generate
from faasmoe.model.presets import preset_config
from faasmoe.model.sampling import SamplingParams
from faasmoe.planning.export import export
from faasmoe.planning.plan import ModelShape
from faasmoe.server.process import ServeProcess
from tests.conftest import TEST_THREADS
from tests.reference import load_reference, reference_greedy, reference_logits
from tests.test_remote_e2e import deploy, remote_model
from tests.test_split_exactness import check_bf16_split, check_fp32_split, prompts_for, split_model

NEW_TOKENS = 16
FP32_TOLERANCE = 1e-5
API_KEY = "sk-families-0001"

# qwen3-tiny: 12 experts top-4, MoE layers 0 and 2 (layer 1 dense); mixtral-tiny: 8 experts top-2, 2 MoE layers.
# Per family: 1 expert per function, a count that does not divide the experts, all of them, 2 layers per function.
CASES = [
    ("qwen3_fp32", 1, 1),
    ("qwen3_fp32", 5, 1),
    ("qwen3_fp32", 12, 1),
    ("qwen3_fp32", 5, 2),
    ("mixtral_fp32", 1, 1),
    ("mixtral_fp32", 3, 1),
    ("mixtral_fp32", 8, 1),
    ("mixtral_fp32", 3, 2),
]


@pytest.mark.parametrize(("model", "experts_per_function", "layers_per_function"), CASES)
def test_fp32_logits_and_greedy_match_transformers(request, tmp_path, model, experts_per_function, layers_per_function):
    check_fp32_split(request.getfixturevalue(model), tmp_path / "plan", experts_per_function, layers_per_function)


@pytest.mark.parametrize(
    ("model", "experts_per_function"),
    [("qwen3_bf16", 1), ("qwen3_bf16", 5), ("qwen3_bf16", 12), ("mixtral_bf16", 1), ("mixtral_bf16", 3)],
)
def test_bf16_logits_bit_identical_and_greedy_tokens_identical(request, tmp_path, model, experts_per_function):
    check_bf16_split(request.getfixturevalue(model), tmp_path / "plan", experts_per_function)


@pytest.mark.parametrize("model", ["qwen3_fp32", "mixtral_fp32"])
def test_batched_decode_equals_each_sequence_alone(request, tmp_path, model):
    split = split_model(request.getfixturevalue(model), tmp_path / "plan", 5)
    prompts = prompts_for(split.vocab_size, [3, 10, 6], seed=2)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    together = generate(split.trunk, prompts, params)
    assert together == [generate(split.trunk, [p], params)[0] for p in prompts]


@pytest.mark.parametrize("model", ["qwen3_fp32", "mixtral_fp32"])
def test_trunk_holds_the_router_but_no_routed_expert(request, tmp_path, model):
    split = split_model(request.getfixturevalue(model), tmp_path / "plan", 4)
    names = [name for name, _ in split.trunk.model.named_parameters()]
    assert not any(".experts." in name or "shared_expert" in name for name in names)
    assert {f"model.layers.{layer}.mlp.gate.weight" for layer in split.plan.model.moe_layers} <= set(names)
    assert not any(p.is_meta for p in split.trunk.model.parameters())


def test_mixtral_shards_hold_w1_w3_as_gate_up_and_w2_as_down(mixtral_fp32, tmp_path):
    plan = export(mixtral_fp32, tmp_path / "plan", 3)
    function = plan.functions[1]
    hub = Checkpoint.open(mixtral_fp32)
    with safe_open(str(tmp_path / "plan" / function.shard), framework="pt") as shard:
        for layer, expert in function.experts:
            prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
            w1, w3, w2 = hub.read([f"{prefix}.w1.weight", f"{prefix}.w3.weight", f"{prefix}.w2.weight"]).values()
            assert torch.equal(shard.get_tensor(expert_key(layer, expert, "gate_up_proj")), torch.cat([w1, w3]))
            assert torch.equal(shard.get_tensor(expert_key(layer, expert, "down_proj")), w2)
    with safe_open(str(tmp_path / "plan" / plan.trunk), framework="pt") as trunk:
        assert "model.layers.0.block_sparse_moe.gate.weight" in trunk.keys()  # the router, under its hub key
        assert not any(".experts." in key for key in trunk.keys())


@pytest.mark.parametrize(
    "preset, mlp_only, step",
    [("qwen3-tiny", [1], 1), ("qwen3-tiny", [], 2), ("qwen3-tiny", [0, 3], 1), ("mixtral-tiny", None, None)],
)
def test_moe_layers_are_the_layers_transformers_builds_a_sparse_block_for(preset, mlp_only, step):
    config = preset_config(preset, layers=5)
    if mlp_only is not None:
        config.mlp_only_layers, config.decoder_sparse_step = mlp_only, step
    family = FAMILIES[config.model_type]
    with torch.device("meta"):
        model = family.causal_lm_class()(config)
    sparse = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, family.sparse_block_class())]
    assert ModelShape.from_config(config).moe_layers == sparse


# Published totals: Qwen3-30B-A3B "30.5B in total", Mixtral 8x7B "46.7B" (their model cards).
@pytest.mark.parametrize(
    "preset, billions, experts, top_k, expert_size",
    [("qwen3-30b-a3b", 30.5, 128, 8, 768), ("mixtral-8x7b", 46.7, 8, 2, 14336)],
)
def test_real_presets_have_the_published_shapes(preset, billions, experts, top_k, expert_size):
    config = preset_config(preset)
    with torch.device("meta"):
        model = FAMILIES[config.model_type].causal_lm_class()(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 1) == billions
    shape = ModelShape.from_config(config)
    assert (shape.num_experts, shape.num_experts_per_tok, shape.moe_intermediate_size) == (experts, top_k, expert_size)
    assert shape.moe_layers == list(range(config.num_hidden_layers))
    assert ModelShape.from_config(preset_config(preset, layers=2)).moe_layers == [0, 1]


def test_export_of_an_architecture_it_cannot_split_names_it_and_the_supported(tmp_path):
    dense = tmp_path / "llama"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    done = CliRunner().invoke(app, ["export", str(dense), str(tmp_path / "plan")])
    assert done.exit_code == 2
    assert done.stderr == (
        f"error: {dense}: architecture 'llama' (LlamaForCausalLM) is not a mixture-of-experts family faasmoe "
        f"can split; supported: {', '.join(FAMILIES)}\n"
    )
    assert not (tmp_path / "plan").exists()


# Sliding-window attention (mixtral's, qwen2_moe's, gpt_oss's) is served: tests/test_family_gpt_oss.py.


@contextmanager
def split_through_gateway(model_dir: Path, plan_dir: Path, experts_per_function: int, layers_per_function: int = 1):
    """The split model with its experts in function processes behind a fresh embedded gateway."""
    export(model_dir, plan_dir, experts_per_function, layers_per_function)
    with GatewayProcess() as gateway:
        deploy(gateway, plan_dir)
        split = remote_model(model_dir, plan_dir, gateway)
        try:
            yield split
        finally:
            split.close()


def test_qwen3_through_the_embedded_gateway(qwen3_fp32, tmp_path):
    reference = load_reference(qwen3_fp32)
    prompts = prompts_for(reference.config.vocab_size, [9, 4])
    with split_through_gateway(qwen3_fp32, tmp_path / "plan", 5, layers_per_function=2) as split:
        ours = split.trunk.step([split.trunk.new_sequence(p) for p in prompts], all_logits=True)
        for mine, theirs in zip(ours, reference_logits(reference, prompts), strict=True):
            assert (mine - theirs).abs().max().item() <= FP32_TOLERANCE
        expected = reference_greedy(reference, prompts, NEW_TOKENS)
        assert generate(split.trunk, prompts, SamplingParams(max_new_tokens=NEW_TOKENS)) == expected


def test_mixtral_bf16_bit_identical_through_the_embedded_gateway(mixtral_bf16, tmp_path):
    # mixtral's router keeps its weights in float32: they go on the wire so, and the functions weight in float32.
    reference = load_reference(mixtral_bf16)
    (prompt,) = prompts_for(reference.config.vocab_size, [9])
    with split_through_gateway(mixtral_bf16, tmp_path / "plan", 3) as split:
        (ours,) = split.trunk.step([split.trunk.new_sequence(prompt)], all_logits=True)
        assert torch.equal(ours, reference_logits(reference, [prompt])[0])
        expected = reference_greedy(reference, [prompt], NEW_TOKENS)
        assert generate(split.trunk, [prompt], SamplingParams(max_new_tokens=NEW_TOKENS)) == expected


def test_openai_endpoint_serves_mixtral(mixtral_fp32, tmp_path):
    """`faasmoe serve` over the embedded gateway and functions: transformers' greedy tokens, and a streamed chat."""
    export(mixtral_fp32, tmp_path / "plan", 3)
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(yaml.safe_dump({"tenants": [{"name": "alpha", "api_keys": [API_KEY]}]}))
    prompt = prompts_for(512, [7])[0]
    model = mixtral_fp32.name  # the served model's name: its folder's
    with GatewayProcess(log_path=tmp_path / "gateway.log") as gateway:
        deploy(gateway, tmp_path / "plan")
        args = ["--model", str(mixtral_fp32), "--plan", str(tmp_path / "plan"), "--tenants", str(tenants),
                "--gateway", gateway.url, "--threads", str(TEST_THREADS)]  # fmt: skip
        with ServeProcess(args=args, log_path=tmp_path / "serve.log") as server:
            body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True}  # fmt: skip
            response = httpx.post(server.url + "/v1/completions", json=body, timeout=60, trust_env=False,
                                  headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
            assert response.status_code == 200, response.text
            expected = reference_greedy(load_reference(mixtral_fp32), [prompt], NEW_TOKENS)[0]
            assert response.json()["choices"][0]["token_ids"] == expected

            client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
            assert [m.id for m in client.models.list().data] == [model]
            messages = [{"role": "user", "content": "Say something."}]
            whole = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
            stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                    stream=True)  # fmt: skip
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert whole.usage.completion_tokens >= 1
            assert streamed == whole.choices[0].message.content
