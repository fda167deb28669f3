"""Model presets for `faasmoe init-model`: Qwen2-MoE configs built offline."""

from __future__ import annotations

from transformers import Qwen2MoeConfig

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

PRESETS: dict[str, dict] = {
    "tiny": TINY,
    "small-mixed": SMALL_MIXED,
    "qwen1.5-moe-a2.7b": QWEN15_MOE_A27B,
    "qwen1.5-bench": QWEN15_BENCH,
}


def preset_config(name: str, layers: int | None = None) -> Qwen2MoeConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    fields = dict(PRESETS[name])
    if layers is not None:
        if layers < 1:
            raise ValueError("--layers must be at least 1")
        fields["num_hidden_layers"] = layers
    return Qwen2MoeConfig(**fields)
