"""The executor protocol: how the trunk asks for routed experts without knowing where they run."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch

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
    def submit(self, tokens: RoutedTokens) -> Future[torch.Tensor]:
        """Starts computing sum_k w_k * expert_k(x) for every token; the future yields [T, H] in x's dtype
        or raises FunctionFailed.

        Returning a future lets the trunk compute the shared expert while the routed experts run.
        """
        ...

    def close(self) -> None:
        """Releases connections and threads; the executor is not used afterwards."""
        ...
