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

    from faasmoe.experts.compute import ExpertMlp

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
    expert_count: str = "num_experts"  # the config field holding the routed experts per layer
    first_dense_layers: str | None = None  # the config field counting the dense layers before the first MoE layer
    hub_router: str = "gate"  # the router's name in the block: model.layers.L.<hub_block>.<hub_router>.weight
    # gpt_oss: a layer's experts in one tensor per projection, model.layers.L.<hub_block>.experts.gate_up_proj
    # [E, H, 2I] (gate and up in alternate columns) and down_proj [E, I, H], each with a _bias, and its clamped
    # SwiGLU; expert_key and hub_projections do not apply
    fused_experts: bool = False

    def expert_key(self, layer: int, expert: int, projection: str) -> str:
        """The hub key of one expert's projection, named as in EXPERT_PROJECTIONS."""
        hub_name = self.hub_projections[EXPERT_PROJECTIONS.index(projection)]
        return f"model.layers.{layer}.{self.hub_block}.experts.{expert}.{hub_name}.weight"

    def fused_expert_key(self, layer: int, name: str) -> str:
        """The hub key of one of a fused family's per-layer expert tensors (``gate_up_proj``, ``down_proj_bias``...)."""
        return f"model.layers.{layer}.{self.hub_block}.experts.{name}"

    def is_routed_expert_key(self, key: str) -> bool:
        return f".{self.hub_block}.experts." in key

    def model_key(self, hub_key: str) -> str:
        """The name the trunk gives a trunk tensor of the hub checkpoint: transformers' model's, but the block is
        always ``mlp`` and its router ``gate`` (SplitMoeBlock's)."""
        return hub_key.replace(f".{self.hub_block}.", ".mlp.").replace(f".mlp.{self.hub_router}.", ".mlp.gate.")

    def expert_mlp(self, config: PretrainedConfig) -> ExpertMlp:
        """The routed experts' maths (faasmoe/experts/compute.py) with the config's constants."""
        from faasmoe.experts.compute import ClampedSwigluMlp, GatedMlp

        if self.fused_experts:
            return ClampedSwigluMlp(alpha=config.swiglu_alpha, limit=config.swiglu_limit)
        return GatedMlp(config.hidden_act)

    def moe_layers(self, config: PretrainedConfig) -> list[int]:
        """The layers transformers builds a sparse block for; the others have a dense MLP."""
        c = config
        if self.first_dense_layers is not None:  # deepseek: k dense layers, then every layer MoE
            return list(range(getattr(c, self.first_dense_layers), c.num_hidden_layers))
        if not self.sparse_step:
            return list(range(c.num_hidden_layers))
        return [
            i
            for i in range(c.num_hidden_layers)
            if i not in c.mlp_only_layers and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0
        ]

    def intermediate_size(self, config: PretrainedConfig) -> int:
        return getattr(config, self.expert_intermediate_size)

    def num_experts(self, config: PretrainedConfig) -> int:
        return getattr(config, self.expert_count)

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
        MoeFamily(
            model_type="olmoe",
            modeling="transformers.models.olmoe.modeling_olmoe",
            causal_lm="OlmoeForCausalLM",
            sparse_block="OlmoeSparseMoeBlock",
            hub_block="mlp",
            hub_projections=EXPERT_PROJECTIONS,
            expert_intermediate_size="intermediate_size",
            sparse_step=False,
        ),
        MoeFamily(
            model_type="deepseek_v3",
            modeling="transformers.models.deepseek_v3.modeling_deepseek_v3",
            causal_lm="DeepseekV3ForCausalLM",
            sparse_block="DeepseekV3MoE",
            hub_block="mlp",  # the shared experts are mlp.shared_experts: not routed, they stay in the trunk
            hub_projections=EXPERT_PROJECTIONS,
            expert_intermediate_size="moe_intermediate_size",
            sparse_step=False,
            expert_count="n_routed_experts",
            first_dense_layers="first_k_dense_replace",
        ),
        MoeFamily(
            model_type="gpt_oss",
            modeling="transformers.models.gpt_oss.modeling_gpt_oss",
            causal_lm="GptOssForCausalLM",
            sparse_block="GptOssMLP",
            hub_block="mlp",
            hub_projections=EXPERT_PROJECTIONS,  # unused: its experts are fused
            expert_intermediate_size="intermediate_size",
            sparse_step=False,
            hub_router="router",
            fused_experts=True,
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
