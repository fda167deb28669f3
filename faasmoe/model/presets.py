"""Model presets for `faasmoe init-model`: configs of each supported MoE family, built offline.

The large presets have the published shapes (depth reduced with ``--layers``); the tiny ones keep each
family's structure at test size.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

# Qwen/Qwen1.5-MoE-A2.7B's published shapes (see docs and shared reference).
QWEN15_MOE_A27B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=60,
    num_experts_per_tok=4,
    moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632,
    norm_topk_prob=False,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=8192,
    hidden_act="silu",
    qkv_bias=True,
)

# Small enough for fast tests, with the real structure (top-4 of many experts, shared expert, qkv bias).
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=12,
    num_experts_per_tok=4,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=96,
    norm_topk_prob=False,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
    hidden_act="silu",
    qkv_bias=True,
)

# A second small shape: renormalised top-2 of 8, grouped-query attention off, every other layer dense.
SMALL_MIXED = dict(
    TINY,
    hidden_size=96,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=6,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=48,
    norm_topk_prob=True,
    decoder_sparse_step=2,
)

# The benchmark's model: Qwen1.5-MoE-A2.7B's per-layer shapes (2048 hidden, 16 heads, 60 experts top-4 of
# 1408, shared expert 5632), but 2 layers and an 8192-token vocabulary, so that a full model per tenant for
# 6 tenants (about 2.4 GB each in bf16) fits a 24 GB machine. Per-layer compute and per-expert sizes are real.
QWEN15_BENCH = dict(QWEN15_MOE_A27B, num_hidden_layers=2, vocab_size=8192)

# Qwen/Qwen3-30B-A3B's published shapes: 128 experts top-8 (renormalised) of 768, no shared expert, q/k norms,
# head_dim 128 (so the attention is wider than the hidden size).
QWEN3_30B_A3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    tie_word_embeddings=False,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
    hidden_act="silu",
    attention_bias=False,
)

# qwen3_moe at test size: head_dim wider than hidden / heads as in the real model, a dense layer in the middle.
QWEN3_TINY = dict(
    QWEN3_30B_A3B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    num_experts=12,
    num_experts_per_tok=4,
    moe_intermediate_size=32,
    mlp_only_layers=[1],
    rope_theta=10000.0,
    max_position_embeddings=512,
)

# mistralai/Mixtral-8x7B-v0.1's published shapes: 8 experts top-2 of 14336, every layer MoE, no shared expert.
MIXTRAL_8X7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=32768,
    sliding_window=None,
    hidden_act="silu",
)

# mixtral at test size (8 experts top-2, grouped-query attention).
MIXTRAL_TINY = dict(
    MIXTRAL_8X7B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

PRESETS_BY_FAMILY: dict[str, dict[str, dict]] = {
    "qwen2_moe": {
        "tiny": TINY,
        "small-mixed": SMALL_MIXED,
        "qwen1.5-moe-a2.7b": QWEN15_MOE_A27B,
        "qwen1.5-bench": QWEN15_BENCH,
    },
    "qwen3_moe": {"qwen3-tiny": QWEN3_TINY, "qwen3-30b-a3b": QWEN3_30B_A3B},
    "mixtral": {"mixtral-tiny": MIXTRAL_TINY, "mixtral-8x7b": MIXTRAL_8X7B},
}
PRESETS: dict[str, dict] = {name: fields for presets in PRESETS_BY_FAMILY.values() for name, fields in presets.items()}


def preset_config(name: str, layers: int | None = None) -> PretrainedConfig:
    """The preset's config, of its family's config class."""
    family = next((f for f, presets in PRESETS_BY_FAMILY.items() if name in presets), None)
    if family is None:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    fields = dict(PRESETS[name])
    if layers is not None:
        if layers < 1:
            raise ValueError("--layers must be at least 1")
        fields["num_hidden_layers"] = layers
    return AutoConfig.for_model(family, **fields)
