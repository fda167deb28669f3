"""`init-model` streams its checkpoint layer by layer: the files are what transformers' save_pretrained writes.

Every family of the registry, at its smallest preset: transformers loads the streamed checkpoint with no key
missing or unexpected, and save_pretrained of a model built in memory with the same weights writes the same
bytes; shards keep to max_shard_size; a seed gives the same bytes; the router skew skews every family's routing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion

from faasmoe.model.checkpoint import INDEX_FILE, Checkpoint, moe_layers
from faasmoe.model.families import FAMILIES
from faasmoe.model.init_model import InitModelOptions, init_model
from faasmoe.model.presets import PRESETS_BY_FAMILY, preset_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # written by build_tokenizer, not by the stream


def smallest_preset(family: str) -> str:
    def size(name: str) -> tuple[int, int, int]:
        config = preset_config(name)
        return config.hidden_size, config.vocab_size, config.num_hidden_layers

    return min(PRESETS_BY_FAMILY[family], key=size)


def weight_files(model_dir: Path) -> dict[str, bytes]:
    """Every file init-model writes but the tokenizer's, by name."""
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.name not in TOKENIZER_FILES}


def file_tensors(path: Path) -> dict[str, int]:
    """The tensors of one safetensors file and their sizes in bytes."""
    with safe_open(path, framework="pt") as f:
        return {k: (t := f.get_tensor(k)).numel() * t.element_size() for k in f.keys()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_checkpoint_is_what_save_pretrained_writes(family, tmp_path):
    preset = smallest_preset(family)
    streamed = init_model(tmp_path / "streamed", InitModelOptions(preset, dtype="bfloat16", max_shard_size="60KB"))
    model, info = AutoModelForCausalLM.from_pretrained(streamed, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    assert model.dtype == torch.bfloat16
    assert (streamed / INDEX_FILE).is_file()

    # A model built in memory as before streaming, holding the same weights, saved by transformers itself
    # (freshly built, not loaded: a loaded one also orders the shards of families with no conversion by name).
    built = AutoModelForCausalLM.from_config(model.config)
    built.load_state_dict(model.state_dict())
    built.save_pretrained(tmp_path / "saved", max_shard_size="60KB")
    assert weight_files(streamed) == weight_files(tmp_path / "saved")  # keys, dtypes, shapes, shards, configs

    checkpoint = Checkpoint.open(streamed)  # the project's own loader reads every tensor and every expert
    assert checkpoint.read(checkpoint.key_to_file).keys() == checkpoint.key_to_file.keys()
    config, moe = checkpoint.config, FAMILIES[family]
    size = moe.intermediate_size(config) * config.hidden_size
    for layer in moe_layers(config):
        for expert in (0, moe.num_experts(config) - 1):
            weights = checkpoint.read_expert(layer, expert)  # in the layout the family's expert maths uses
            assert (weights.gate_up.numel(), weights.down.numel()) == (2 * size, size)


def test_shards_keep_to_max_shard_size_and_the_index_covers_every_tensor(tmp_path):
    limit = 100_000
    model_dir = init_model(tmp_path / "m", InitModelOptions("tiny", dtype="float32", max_shard_size="100KB"))
    index = json.loads((model_dir / INDEX_FILE).read_text())
    files = {name: file_tensors(model_dir / name) for name in sorted(set(index["weight_map"].values()))}
    assert len(files) > 3
    assert {k: name for name, tensors in files.items() for k in tensors} == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(sum(t.values()) for t in files.values())

    # The hub tensors each model tensor becomes (one, or the per-expert slices of a fused experts tensor):
    # save_pretrained keeps them together and measures them as one, as their storage is shared.
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    state = model.state_dict()
    assert set(revert_weight_conversion(model, state)) == set(index["weight_map"])
    groups = {k: (set(revert_weight_conversion(model, {k: v})), v.numel() * v.element_size()) for k, v in state.items()}
    oversized = 0
    for tensors in files.values():
        if sum(tensors.values()) > limit:  # only one model tensor larger than the limit, alone in its file
            oversized += 1
            assert any(keys == set(tensors) and size > limit for keys, size in groups.values()), sorted(tensors)
    assert oversized > 0  # the embedding, the head and the fused experts here are over the limit


def test_same_seed_same_bytes(tmp_path):
    def write(name: str, seed: int) -> dict[str, bytes]:
        options = InitModelOptions("small-mixed", dtype="bfloat16", seed=seed, router_skew=1.0, max_shard_size="200KB")
        return weight_files(init_model(tmp_path / name, options))

    first = write("a", 3)
    assert write("b", 3) == first
    other = write("c", 4)  # another seed: the same files and configs, other weights
    assert other.keys() == first.keys() and other["config.json"] == first["config.json"]
    assert all(other[name] != first[name] for name in first if name.endswith(".safetensors"))


def test_rerun_into_the_same_directory_leaves_no_stale_shards(tmp_path):
    model_dir = tmp_path / "m"
    init_model(model_dir, InitModelOptions("tiny", dtype="float32", max_shard_size="100KB"))
    init_model(model_dir, InitModelOptions("tiny", dtype="float32"))
    assert sorted(p.name for p in model_dir.glob("model*")) == ["model.safetensors"]
    Checkpoint.open(model_dir)


@torch.inference_mode()
def hottest_expert_share(model_dir: Path) -> list[float]:
    """Per MoE layer, the share of tokens whose top-1 routed expert is the layer's most chosen one."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0))
    router_logits = model(ids, output_router_logits=True).router_logits
    return [torch.bincount(logits.argmax(-1)).max().item() / logits.shape[0] for logits in router_logits]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_router_skew_makes_a_hot_expert(family, tmp_path):
    preset = smallest_preset(family)
    config = preset_config(preset)
    uniform = 1 / FAMILIES[family].num_experts(config)
    plain = hottest_expert_share(init_model(tmp_path / "plain", InitModelOptions(preset, dtype="float32")))
    skewed = hottest_expert_share(
        init_model(tmp_path / "skewed", InitModelOptions(preset, dtype="float32", router_skew=1.0))
    )
    assert len(skewed) == len(moe_layers(config))
    assert all(share >= max(0.5, 4 * uniform) for share in skewed), (skewed, uniform)
    assert sum(plain) < sum(skewed)
