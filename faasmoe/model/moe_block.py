"""The MoE block of the trunk: router -> executor (routed experts, anywhere) -> combine with the shared expert.

The block defines what it needs from an executor (``ExpertExecutor``, ``RoutedTokens``, ``FunctionFailed``);
``faasmoe.dispatch`` implements it, in-process or through the functions.

Shape legend: B batch, L positions, T = B * L tokens, K top-k, H hidden.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from faasmoe.errors import FaasmoeError


class FunctionFailed(FaasmoeError):
    """An expert function could not compute its share; the message holds the detail, for the operator's log.

    ``unavailable``: no replica answered (unreachable, busy or starting) after the client's retries, so a
    later try may succeed; otherwise the function answered an error.
    """

    def __init__(self, function: str, message: str, *, unavailable: bool) -> None:
        super().__init__(message)
        self.function = function
        self.unavailable = unavailable


@dataclass(frozen=True)
class RoutedTokens:
    """One MoE layer's tokens with their router choices. T tokens, K top-k, H hidden."""

    layer: int
    hidden: torch.Tensor  # [T, H]
    expert_ids: torch.Tensor  # [T, K] int64
    weights: torch.Tensor  # [T, K] routing weights, model dtype


class ExpertExecutor(Protocol):
    """How the block asks for routed experts without knowing where they run."""

    def submit(self, tokens: RoutedTokens) -> Future[torch.Tensor]:
        """Starts computing sum_k w_k * expert_k(x) for every token; the future yields [T, H] in x's dtype
        or raises FunctionFailed.

        Returning a future lets the trunk compute the shared expert while the routed experts run.
        """
        ...

    def close(self) -> None:
        """Releases connections and threads; the executor is not used afterwards."""
        ...


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
