"""`faasmoe init-model`: a randomly initialised checkpoint of a supported MoE family in its hub format,
plus a tokenizer, streamed to disk one layer at a time.

Nothing is downloaded: the config comes from a preset, the weights from a seeded generator, and the
tokenizer is trained offline on a corpus the package ships.

The model is built on the meta device (names, shapes and dtypes, no memory), as ``from_config`` builds it in
the checkpoint's dtype. Each unit of it (the embedding, one decoder layer, the final norm, the head) is then
materialised in turn, initialised by the model's own ``_init_weights`` and turned into hub tensors by
transformers' own save-time conversion (e.g. fused experts back to per-expert keys). They go to the shards
``save_pretrained`` would put them in, and a shard is written as soon as all its tensors exist: peak memory
is about one shard plus one layer, and the files are the ones ``save_pretrained`` writes for the same
weights (tests/test_init_model_stream.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from faasmoe.model.checkpoint import INDEX_FILE, SINGLE_FILE
from faasmoe.model.families import FAMILIES
from faasmoe.model.presets import preset_config
from faasmoe.model.tokenizer import build_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SHARD_PATTERN = SINGLE_FILE.replace(".safetensors", "{suffix}.safetensors")  # model-00001-of-00003.safetensors


@dataclass(frozen=True)
class InitModelOptions:
    preset: str = "tiny"
    layers: int | None = None
    dtype: str = "bfloat16"
    seed: int = 0
    router_skew: float = 0.0  # Zipf exponent of expert popularity; 0 leaves the router uniform-ish
    max_shard_size: str = "5GB"  # smaller values write a sharded checkpoint with an index file


def parse_dtype(name: str) -> torch.dtype:
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)} (or bf16, fp16, fp32)")
    return DTYPES[name]


def init_model(out_dir: Path, options: InitModelOptions) -> Path:
    dtype = parse_dtype(options.dtype)
    config = preset_config(options.preset, options.layers)
    sparse_block = FAMILIES[config.model_type].sparse_block_class()
    with torch.device("meta"):  # as from_config(dtype=...) builds it: tensors the model pins keep their dtype
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_pretrained's config files: the dtype recorded as a string, the class as the architecture
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    torch.manual_seed(options.seed)
    hidden = model.get_input_embeddings().embedding_dim
    skew = RouterSkew(options.router_skew, hidden, options.seed) if options.router_skew > 0 else None

    @torch.no_grad()
    def materialise(unit: nn.Module) -> None:
        unit.to_empty(device="cpu")
        unit.apply(model._init_weights)  # what from_pretrained runs on the weights a checkpoint lacks
        if skew is not None:
            if unit is model.get_input_embeddings():
                skew.embedding(unit.weight)
            for router in _routers(unit, sparse_block):
                skew.router(router.weight)

    write_weights(model, out_dir, options.max_shard_size, materialise)
    build_tokenizer(out_dir, vocab_size=config.vocab_size)
    return out_dir


def write_weights(
    model: PreTrainedModel,
    out_dir: Path,
    max_shard_size: str,
    materialise: Callable[[nn.Module], None],
) -> None:
    """Writes a meta-device model's weights as save_pretrained does, materialising one unit at a time.

    ``materialise(unit)`` gives a unit real, initialised tensors; the unit goes back to meta
    once its hub tensors are taken, and each shard's tensors are freed once the shard is written.
    """
    state = model.state_dict()  # meta tensors: names and shapes only
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    hub = revert_weight_conversion(model, state)  # the hub keys, in save_pretrained's order
    split = split_state_dict_into_shards_factory(
        hub,
        # As on real tensors: the views one model tensor becomes (per-expert slices of fused experts)
        # share its storage, which is counted once and kept in one shard.
        get_storage_size=lambda t: _root(t).numel() * t.itemsize,
        get_storage_id=lambda t: id(_root(t)),
        filename_pattern=SHARD_PATTERN,
        max_shard_size=max_shard_size,
    )
    order = {key: i for i, key in enumerate(hub)}
    units = dict(_units(model))
    unit_keys = {name: list(revert_weight_conversion(model, _under(state, name))) for name in units}
    unit_keys = {name: keys for name, keys in unit_keys.items() if keys}  # e.g. rotary buffers are not saved
    outside = set(hub) - {k for keys in unit_keys.values() for k in keys}
    if outside:
        raise ValueError(f"{type(model).__name__} has weights outside its layers: {sorted(outside)[:3]}")

    for stale in [*out_dir.glob("model-*-of-*.safetensors"), out_dir / SINGLE_FILE, out_dir / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # a previous run's files would be read with ours
    pending = dict(split.filename_to_tensors)
    ready: dict[str, torch.Tensor] = {}
    for name in sorted(unit_keys, key=lambda n: min(order[k] for k in unit_keys[n])):  # shards fill in turn
        unit = units[name]
        materialise(unit)
        tensors = {k: v for k, v in unit.state_dict(prefix=name + ".").items() if k in state}
        ready.update(revert_weight_conversion(model, tensors))
        unit.to_empty(device="meta")  # the hub tensors still to write keep their storage alive
        for filename, keys in list(pending.items()):
            if all(k in ready for k in keys):
                save_file({k: ready.pop(k) for k in keys}, out_dir / filename, metadata={"format": "pt"})
                del pending[filename]
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": model.num_parameters(), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _units(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The model's children, each layer of a ModuleList on its own, descending into the base model."""
    for name, child in module.named_children():
        path = prefix + name
        if isinstance(child, nn.ModuleList):
            yield from ((f"{path}.{i}", layer) for i, layer in enumerate(child))
        elif isinstance(child, PreTrainedModel):
            yield from _units(child, path + ".")
        else:
            yield path, child


def _under(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(name + ".")}


def _root(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor._base is None else tensor._base


def _routers(unit: nn.Module, sparse_block: type[nn.Module]) -> list[nn.Module]:
    """The routers of a unit's MoE blocks: the block's child that scores its experts (transformers' TopKRouter)."""
    return [
        child
        for block in unit.modules()
        if isinstance(block, sparse_block)
        for name, child in block.named_children()
        if name != "experts" and hasattr(child, "num_experts")
    ]


class RouterSkew:
    """Makes expert popularity Zipf-like, as in trained routers (a few hot experts per layer).

    Every token embedding gets a shared component along a direction u, which survives the norms as a
    roughly constant u.x of about sqrt(H / 2). Adding -exponent * log(rank_e) / sqrt(H / 2) * u to
    expert e's router row then adds about -exponent * log(rank_e) to its logit: p_e ~ rank_e^-exponent.
    The embedding and each router are skewed as they are materialised, along the same u.
    """

    def __init__(self, exponent: float, hidden: int, seed: int) -> None:
        self.exponent = exponent
        self.generator = torch.Generator().manual_seed(seed)
        u = torch.randn(hidden, generator=self.generator)
        self.direction = u / u.norm()

    def embedding(self, weight: torch.Tensor) -> None:
        weight += weight.norm(dim=1, keepdim=True) * self.direction  # shared direction as large as each embedding

    def router(self, weight: torch.Tensor) -> None:
        experts, hidden = weight.shape
        ranks = torch.randperm(experts, generator=self.generator).float() + 1  # the hot experts differ per layer
        weight += (-self.exponent / math.sqrt(hidden / 2) * torch.log(ranks))[:, None] * self.direction[None, :]
