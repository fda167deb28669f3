"""Attention for many sequences in one step: projections batched, the attention itself per sequence.

transformers' attention modules (Qwen2MoeAttention, Qwen3MoeAttention, MixtralAttention: the same steps,
qwen3 adding an RMSNorm per head on q and k) project, rotate, update one cache and attend for one batch
of equally long sequences. Continuous batching has sequences of different lengths, each with its own
cache, so this runs the same steps with the module's own projections and transformers' own rotary and
attention functions, but projects every sequence's new tokens with one matmul (as vLLM does): the
weights are read once per step instead of once per sequence.

Shape legend: N new tokens of all sequences, n_i of sequence i, H hidden, A heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_moe.modeling_qwen2_moe import (  # the same functions in every family's module
    apply_rotary_pos_emb,
    eager_attention_forward,
)


@dataclass(frozen=True)
class SequenceSlice:
    """Where one sequence's new tokens are in the step, with its cache and attention inputs."""

    span: slice  # rows of the step's N tokens
    cache: DynamicCache
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin: [1, n_i, D]
    mask: torch.Tensor | None  # causal mask over the cache and the new tokens, or None when implicit
    position_ids: torch.Tensor  # [1, n_i]


def batched_attention(attn: nn.Module, hidden: torch.Tensor, sequences: list[SequenceSlice]) -> torch.Tensor:
    """Self-attention of every sequence's new tokens over its own cache: [N, H] -> [N, H]."""
    query, key, value = attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden)  # [N, A * D] each
    if hasattr(attn, "q_norm"):  # qwen3_moe normalises each head's q and k before the rotary embedding
        heads = (hidden.shape[0], -1, attn.head_dim)  # [N, A, D]
        query, key = attn.q_norm(query.view(heads)).flatten(1), attn.k_norm(key.view(heads)).flatten(1)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    outputs = []
    for seq in sequences:
        heads = (1, seq.span.stop - seq.span.start, -1, attn.head_dim)  # [1, n_i, A, D]
        q, k, v = (t[seq.span].view(heads).transpose(1, 2) for t in (query, key, value))  # [1, A, n_i, D]
        q, k = apply_rotary_pos_emb(q, k, *seq.position_embeddings)
        k, v = seq.cache.update(k, v, attn.layer_idx)
        out, _ = attend(attn, q, k, v, seq.mask, dropout=0.0, scaling=attn.scaling, position_ids=seq.position_ids)
        outputs.append(out.reshape(out.shape[1], -1))  # [n_i, A * D]
    return attn.o_proj(torch.cat(outputs))
