"""Attention for many sequences in one step: projections batched, the attention itself per sequence.

transformers' attention modules (Qwen2MoeAttention, Qwen3MoeAttention, MixtralAttention, OlmoeAttention:
the same steps, qwen3 adding an RMSNorm per head on q and k, olmoe one over the whole q and k projections)
project, rotate, update one cache and attend for one batch of equally long sequences; deepseek_v3's
multi-head latent attention (DeepseekV3Attention) caches a compressed latent instead and expands it into
keys and values after the cache update. Continuous batching has sequences of different lengths, each
with its own cache, so this runs the same steps with the module's own projections and transformers' own
rotary and attention functions, but projects every sequence's new tokens with one matmul (as vLLM does):
the weights are read once per step instead of once per sequence. Rotary and eager attention are each
family module's own: gpt_oss's (GptOssAttention) rotate by halves, and attend with a learnt sink logit
per head (its eager attention is the only one the family supports); its sliding-window layers differ
only in their masks (the trunk's).

Shape legend: N new tokens of all sequences, n_i of sequence i, H hidden, A heads, D head dim.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


@dataclass(frozen=True)
class SequenceSlice:
    """Where one sequence's new tokens are in the step, with its cache and attention inputs."""

    span: slice  # rows of the step's N tokens
    cache: DynamicCache
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin: [1, n_i, D]
    mask: torch.Tensor | None  # causal (or sliding-window) mask over the cache and the new tokens; None: implicit
    position_ids: torch.Tensor  # [1, n_i]


def batched_attention(attn: nn.Module, hidden: torch.Tensor, sequences: list[SequenceSlice]) -> torch.Tensor:
    """Self-attention of every sequence's new tokens over its own cache: [N, H] -> [N, H]."""
    if hasattr(attn, "kv_a_proj_with_mqa"):  # deepseek_v3
        return _latent_attention(attn, hidden, sequences)
    query, key, value = _project(attn, hidden)
    modeling = sys.modules[type(attn).__module__]  # the family's transformers module
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, modeling.eager_attention_forward)
    outputs = []
    for seq in sequences:
        heads = (1, seq.span.stop - seq.span.start, -1, attn.head_dim)  # [1, n_i, A, D]
        q, k, v = (t[seq.span].view(heads).transpose(1, 2) for t in (query, key, value))  # [1, A, n_i, D]
        q, k = modeling.apply_rotary_pos_emb(q, k, *seq.position_embeddings)
        k, v = seq.cache.update(k, v, attn.layer_idx)
        out, _ = attend(attn, q, k, v, seq.mask, dropout=0.0, scaling=attn.scaling, position_ids=seq.position_ids)
        outputs.append(out.reshape(out.shape[1], -1))  # [n_i, A * D]
    return attn.o_proj(torch.cat(outputs))


def _project(attn: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every new token's q, k and v [N, A * D] as the family's module projects them, before the rotary embedding."""
    query, key, value = attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden)  # [N, A * D] each
    if attn.config.model_type == "olmoe":  # one RMSNorm over the whole q and one over k, then clip_qkv
        query, key = attn.q_norm(query), attn.k_norm(key)
        if (clip := attn.config.clip_qkv) is not None:
            query, key, value = (t.clamp(-clip, clip) for t in (query, key, value))
    elif hasattr(attn, "q_norm"):  # qwen3_moe normalises each head's q and k
        heads = (hidden.shape[0], -1, attn.head_dim)  # [N, A, D]
        query, key = attn.q_norm(query.view(heads)).flatten(1), attn.k_norm(key.view(heads)).flatten(1)
    return query, key, value


def _latent_attention(attn: nn.Module, hidden: torch.Tensor, sequences: list[SequenceSlice]) -> torch.Tensor:
    """deepseek_v3's multi-head latent attention, DeepseekV3Attention.forward step by step: [N, H] -> [N, H].

    The cache holds each token's normalised latent [R] and rotated shared key part [P] (one "head" each);
    the module's expand_kv turns a sequence's whole cache into keys [A, Dn + P] and values [A, Dv].
    R kv_lora_rank, Dn qk_nope_head_dim, P qk_rope_head_dim, Dv v_head_dim.
    """
    if attn.q_lora_rank is None:
        query = attn.q_proj(hidden)  # [N, A * (Dn + P)]
    else:
        query = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(hidden)))
    latent, k_rot = torch.split(attn.kv_a_proj_with_mqa(hidden), [attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    latent = attn.kv_a_layernorm(latent)  # [N, R]
    modeling = sys.modules[type(attn).__module__]  # the family's transformers module
    rotate = modeling.apply_rotary_pos_emb_interleave if attn.config.rope_interleave else modeling.apply_rotary_pos_emb
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, modeling.eager_attention_forward)
    outputs = []
    for seq in sequences:
        n = seq.span.stop - seq.span.start
        q = query[seq.span].view(1, n, -1, attn.qk_head_dim).transpose(1, 2)  # [1, A, n, Dn + P]
        q_pass, q_rot = torch.split(q, [attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
        kv_nope = latent[seq.span].view(1, 1, n, attn.kv_lora_rank)
        k_pe = k_rot[seq.span].view(1, 1, n, attn.qk_rope_head_dim)
        q_rot, k_pe = rotate(q_rot, k_pe, *seq.position_embeddings)
        kv_nope, k_pe = seq.cache.update(kv_nope, k_pe, attn.layer_idx)  # [1, 1, cached + n, R], [.., P]
        key, value = attn.expand_kv(kv_nope, k_pe)  # [1, A, cached + n, Dn + P], [.., Dv]
        q = torch.cat((q_pass, q_rot), dim=-1)
        out, _ = attend(attn, q, key, value, seq.mask, dropout=0.0, scaling=attn.scaling, position_ids=seq.position_ids)
        outputs.append(out.reshape(n, -1))  # [n, A * Dv]
    return attn.o_proj(torch.cat(outputs))
