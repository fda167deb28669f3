"""The MoE block of the trunk: router -> executor (routed experts, anywhere) -> combine with the shared expert.

Shape legend: B batch, L positions, T = B * L tokens, K top-k, H hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from faasmoe.dispatch.executor import ExpertExecutor, RoutedTokens


class SplitMoeBlock(nn.Module):
    """Replaces transformers' Qwen2MoeSparseMoeBlock; keeps its router and shared expert, not its experts."""

    def __init__(self, block: Qwen2MoeSparseMoeBlock, layer: int, executor: ExpertExecutor) -> None:
        super().__init__()
        self.gate = block.gate
        self.shared_expert = block.shared_expert
        self.shared_expert_gate = block.shared_expert_gate
        self.layer = layer
        self.executor = executor

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, L, H = hidden_states.shape
        x = hidden_states.view(-1, H)  # [T, H]
        _, weights, expert_ids = self.gate(x)  # [T, K] each
        routed = self.executor.submit(RoutedTokens(self.layer, x, expert_ids, weights))
        # The shared expert runs here while the routed experts are in flight.
        shared = F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # [T, H]
        return (routed.result() + shared).view(B, L, H)
