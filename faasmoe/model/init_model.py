"""`faasmoe init-model`: a randomly initialised checkpoint of a supported MoE family in its hub format
(transformers' own model class writes it), plus a tokenizer.

Nothing is downloaded: the config comes from a preset, the weights from a seeded generator, and the
tokenizer is trained offline on a corpus the package ships.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from faasmoe.model.families import FAMILIES
from faasmoe.model.presets import preset_config
from faasmoe.model.tokenizer import build_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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
    torch.manual_seed(options.seed)
    model = FAMILIES[config.model_type].causal_lm_class()(config)
    if options.router_skew > 0:
        skew_routers(model, options.router_skew, torch.Generator().manual_seed(options.seed))
    model = model.to(dtype)
    model.config.dtype = dtype
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=options.max_shard_size)
    build_tokenizer(out_dir, vocab_size=config.vocab_size)
    return out_dir


@torch.no_grad()
def skew_routers(model: PreTrainedModel, exponent: float, generator: torch.Generator) -> None:
    """Makes expert popularity Zipf-like, as in trained routers (a few hot experts per layer).

    Every token embedding gets a shared component along a direction u, which survives the norms as a
    roughly constant u.x of about sqrt(H / 2). Adding -exponent * log(rank_e) / sqrt(H / 2) * u to
    expert e's router row then adds about -exponent * log(rank_e) to its logit: p_e ~ rank_e^-exponent.
    """
    embed = model.model.embed_tokens.weight
    H = embed.shape[1]
    u = torch.randn(H, generator=generator)
    u /= u.norm()
    embed += embed.norm(dim=1, keepdim=True) * u  # shared direction as large as each embedding
    scale = exponent / math.sqrt(H / 2)
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is None:  # a dense layer has no router
            continue
        E = gate.weight.shape[0]
        ranks = torch.randperm(E, generator=generator).float() + 1  # which experts are hot differs per layer
        gate.weight += (-scale * torch.log(ranks))[:, None] * u[None, :]
