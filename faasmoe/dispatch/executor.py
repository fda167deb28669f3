"""The executor protocol: how the trunk asks for routed experts without knowing where they run."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class RoutedTokens:
    """One MoE layer's tokens with their router choices. T tokens, K top-k, H hidden."""

    layer: int
    hidden: torch.Tensor  # [T, H]
    expert_ids: torch.Tensor  # [T, K] int64
    weights: torch.Tensor  # [T, K] routing weights, model dtype


class ExpertExecutor(Protocol):
    def submit(self, tokens: RoutedTokens) -> Future[torch.Tensor]:
        """Starts computing sum_k w_k * expert_k(x) for every token; the future yields [T, H] in x's dtype.

        Returning a future lets the trunk compute the shared expert while the routed experts run.
        """
        ...

    def close(self) -> None:
        """Releases connections and threads; the executor is not used afterwards."""
        ...
