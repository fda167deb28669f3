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

# allenai/OLMoE-1B-7B-0924's published shapes: 64 experts top-8 of 1024 (not renormalised), every layer MoE,
# no shared expert, one RMSNorm over the whole q projection and one over the whole k projection.
OLMOE_1B_7B = dict(
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=1024,  # olmoe's one expert (it has no dense MLP)
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    norm_topk_prob=False,
    clip_qkv=None,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    hidden_act="silu",
    attention_bias=False,
    pad_token_id=1,
    eos_token_id=50279,
)

# olmoe at test size, with grouped-query attention and clip_qkv set (off in the published model) so that the
# clamp after the q/k norms is exercised.
OLMOE_TINY = dict(
    OLMOE_1B_7B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=16,
    num_experts_per_tok=4,
    clip_qkv=1.5,
    max_position_embeddings=512,
    eos_token_id=None,
)

# moonshotai/Moonlight-16B-A3B's published shapes (deepseek_v3 architecture): 64 routed experts top-6 of 1408
# with sigmoid scores and a correction bias, in one group (n_group 1), weights renormalised and scaled by
# 2.446; 2 ungated shared experts; layer 0 dense; MLA without a q low-rank (q_lora_rank None).
MOONLIGHT_16B_A3B = dict(
    vocab_size=163840,
    hidden_size=2048,
    intermediate_size=11264,  # the dense first layer's MLP
    moe_intermediate_size=1408,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_shared_experts=2,
    routed_scaling_factor=2.446,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    first_k_dense_replace=1,
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    tie_word_embeddings=False,
    rope_theta=50000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    hidden_act="silu",
    attention_bias=False,
    bos_token_id=163584,
    eos_token_id=163585,
)

# deepseek_v3 at test size: 16 experts in 4 groups of which each token may use 2 (group-limited top-4), a dense
# first layer, and value heads narrower than query/key heads as in the real model.
DEEPSEEK_TINY = dict(
    MOONLIGHT_16B_A3B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    rope_theta=10000.0,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
)

# DeepSeek-V3's attention at test size: the query through a low-rank projection with its norm (q_lora_rank).
DEEPSEEK_V3_TINY = dict(DEEPSEEK_TINY, q_lora_rank=24)

# openai/gpt-oss-20b's published shapes: 32 experts top-4 of 2880, with biases and the clamped SwiGLU, every layer
# MoE; 64 query heads of 64 over 8 key/value heads (wider than the hidden size), with biases and a learnt sink per
# head; a 128-token sliding window on every other layer from layer 0 (GptOssConfig's layer_types, rebuilt for
# --layers); YaRN rope as GptOssConfig's default (theta 150000, factor 32 over 4096 positions). The hub's experts
# are MXFP4; a preset writes them in the dtype asked.
GPT_OSS_20B = dict(
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    num_hidden_layers=24,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=64,
    num_local_experts=32,
    num_experts_per_tok=4,
    swiglu_alpha=1.702,
    swiglu_limit=7.0,
    sliding_window=128,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    hidden_act="silu",
    attention_bias=True,
)

# gpt_oss at test size, the same structure (head_dim wider than hidden / heads too) with a 6-token window, which
# test prompts exceed. Hidden and intermediate sizes are multiples of 32, as MXFP4's blocks need.
GPT_OSS_TINY = dict(
    GPT_OSS_20B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    num_local_experts=8,
    sliding_window=6,
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
    "olmoe": {"olmoe-tiny": OLMOE_TINY, "olmoe-1b-7b": OLMOE_1B_7B},
    "deepseek_v3": {
        "deepseek-tiny": DEEPSEEK_TINY,
        "deepseek-v3-tiny": DEEPSEEK_V3_TINY,
        "moonlight-16b-a3b": MOONLIGHT_16B_A3B,
    },
    "gpt_oss": {"gpt-oss-tiny": GPT_OSS_TINY, "gpt-oss-20b": GPT_OSS_20B},
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
