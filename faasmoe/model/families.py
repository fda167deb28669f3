"""The MoE families faasmoe splits, by transformers' ``model_type``: where each keeps its routed experts.

transformers 5 runs every family's routed experts through one experts module, called as
``experts(hidden, top_k_index, top_k_weights)`` after the family's own router. faasmoe replaces the
family's sparse block with SplitMoeBlock at that point, so a family needs only: its classes, the hub
keys of expert e's gate, up and down projections in layer l, the config field of an expert's size and
which layers hold experts. Everything else (router, shared expert, attention, norms) stays the model's
own code. docs/families.md says what differs per family.

It imports transformers only when a class is asked for: expert functions import it (through checkpoint.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

# An expert's projections by the names faasmoe uses (in shards too): the order of gate, up, down.
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoeFamily:
    model_type: str
    modeling: str  # the transformers module holding the classes below
    causal_lm: str  # the causal LM class
    sparse_block: str  # the MoE block class SplitMoeBlock replaces
    hub_block: str  # a layer's MoE block in the hub keys: model.layers.L.<hub_block>.experts.E.<projection>.weight
    hub_projections: tuple[str, str, str]  # the hub names of gate, up and down
    expert_intermediate_size: str  # the config field holding one expert's intermediate size
    sparse_step: bool  # layers by qwen's decoder_sparse_step / mlp_only_layers rule; False: every layer is MoE

    def expert_key(self, layer: int, expert: int, projection: str) -> str:
        """The hub key of one expert's projection, named as in EXPERT_PROJECTIONS."""
        hub_name = self.hub_projections[EXPERT_PROJECTIONS.index(projection)]
        return f"model.layers.{layer}.{self.hub_block}.experts.{expert}.{hub_name}.weight"

    def is_routed_expert_key(self, key: str) -> bool:
        return f".{self.hub_block}.experts." in key

    def model_key(self, hub_key: str) -> str:
        """The name transformers' model gives a trunk tensor of the hub checkpoint (its block is ``mlp``)."""
        return hub_key.replace(f".{self.hub_block}.", ".mlp.")

    def moe_layers(self, config: PretrainedConfig) -> list[int]:
        """The layers transformers builds a sparse block for; the others have a dense MLP."""
        c = config
        if not self.sparse_step:
            return list(range(c.num_hidden_layers))
        return [
            i
            for i in range(c.num_hidden_layers)
            if i not in c.mlp_only_layers and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0
        ]

    def intermediate_size(self, config: PretrainedConfig) -> int:
        return getattr(config, self.expert_intermediate_size)

    def causal_lm_class(self) -> type[nn.Module]:
        return getattr(importlib.import_module(self.modeling), self.causal_lm)

    def sparse_block_class(self) -> type[nn.Module]:
        return getattr(importlib.import_module(self.modeling), self.sparse_block)


FAMILIES: dict[str, MoeFamily] = {
    f.model_type: f
    for f in (
        MoeFamily(
            model_type="qwen2_moe",
            modeling="transformers.models.qwen2_moe.modeling_qwen2_moe",
            causal_lm="Qwen2MoeForCausalLM",
            sparse_block="Qwen2MoeSparseMoeBlock",
            hub_block="mlp",
            hub_projections=EXPERT_PROJECTIONS,
            expert_intermediate_size="moe_intermediate_size",
            sparse_step=True,
        ),
        MoeFamily(
            model_type="qwen3_moe",
            modeling="transformers.models.qwen3_moe.modeling_qwen3_moe",
            causal_lm="Qwen3MoeForCausalLM",
            sparse_block="Qwen3MoeSparseMoeBlock",
            hub_block="mlp",
            hub_projections=EXPERT_PROJECTIONS,
            expert_intermediate_size="moe_intermediate_size",
            sparse_step=True,
        ),
        MoeFamily(
            model_type="mixtral",
            modeling="transformers.models.mixtral.modeling_mixtral",
            causal_lm="MixtralForCausalLM",
            sparse_block="MixtralSparseMoeBlock",
            hub_block="block_sparse_moe",
            hub_projections=("w1", "w3", "w2"),  # w1 gate, w3 up, w2 down (transformers' conversion_mapping)
            expert_intermediate_size="intermediate_size",
            sparse_step=False,
        ),
    )
}


def unsupported(config: dict) -> str:
    """Why a config.json's architecture cannot be split: it names the architecture and the supported ones."""
    architectures = config.get("architectures") or []
    named = repr(config.get("model_type")) + (f" ({', '.join(architectures)})" if architectures else "")
    return (
        f"architecture {named} is not a mixture-of-experts family faasmoe can split; supported: {', '.join(FAMILIES)}"
    )
