"""The MoE block of the trunk: router -> executor (routed experts, anywhere) -> combine with the shared expert
(in the families that have one).

The block defines what it needs from an executor (``ExpertExecutor``, ``RoutedTokens``, ``FunctionFailed``);
``faasmoe.dispatch`` implements it, in-process or through the functions.

Shape legend: B batch, L positions, T = B * L tokens, K top-k, H hidden.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

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
    weights: torch.Tensor  # [T, K] routing weights, in the dtype the family's router gives (model dtype or float32)


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


@dataclass
class RoutedTime:
    """Seconds a block's thread spent on its routed experts since the last ``take``, for the step breakdown.

    ``submit_s`` is spent inside executor.submit: scatter and encode, or with in-process experts their
    whole compute; ``wait_s`` blocked on the result once the shared expert is done. Only the thread that
    steps the trunk adds and takes, so no lock.
    """

    submit_s: float = 0.0
    wait_s: float = 0.0

    def add(self, submit_s: float, wait_s: float) -> None:
        self.submit_s += submit_s
        self.wait_s += wait_s

    def take(self) -> RoutedTime:
        taken = RoutedTime(self.submit_s, self.wait_s)
        self.submit_s = self.wait_s = 0.0
        return taken


# Sees each step's router choices (layer, expert_ids [T, K]) before the experts run; must not change them.
RoutingObserver = Callable[[int, torch.Tensor], None]
# Sees each step's (layer, router input x [T, H], expert_ids [T, K]) while the experts run; must not change them.
LookaheadHook = Callable[[int, torch.Tensor, torch.Tensor], None]


class SplitMoeBlock(nn.Module):
    """Replaces a family's transformers sparse block (faasmoe/model/families.py); keeps its router and its
    shared expert where it has one (qwen2_moe's sigmoid-gated, deepseek_v3's ungated), not its routed experts."""

    def __init__(self, block: nn.Module, layer: int, executor: ExpertExecutor) -> None:
        super().__init__()
        # every family's router returns (logits, weights [T, K], expert_ids [T, K]); gpt_oss calls it router
        self.gate = block.router if hasattr(block, "router") else block.gate
        self.shared_expert: nn.Module | None = getattr(block, "shared_expert", None)
        self.shared_expert_gate: nn.Module | None = getattr(block, "shared_expert_gate", None)
        self.shared_experts: nn.Module | None = getattr(block, "shared_experts", None)  # deepseek_v3's, ungated
        self.layer = layer
        self.executor = executor
        self.routed_time = RoutedTime()
        self.observer: RoutingObserver | None = None  # routing statistics (faasmoe/elastic), when on
        self.lookahead: LookaheadHook | None = None  # wakes the next layer's functions early (elastic/lookahead.py)

    def forward(self, hidden_states: torch.Tensor) -> PendingMoe:
        """Routes [B, L, H], sends the routed experts off and computes the shared expert while they run; the
        trunk can compute another micro-batch before it waits (``PendingMoe.finish``)."""
        B, L, H = hidden_states.shape
        x = hidden_states.view(-1, H)  # [T, H]
        _, weights, expert_ids = self.gate(x)  # [T, K] each
        if self.observer is not None:
            self.observer(self.layer, expert_ids)
        started = time.perf_counter()
        routed = self.executor.submit(RoutedTokens(self.layer, x, expert_ids, weights))
        submitted = time.perf_counter()
        if self.lookahead is not None:  # guesses the next layer's experts while this layer's run
            self.lookahead(self.layer, x, expert_ids)
        # The shared expert runs here while the routed experts are in flight.
        if self.shared_expert is not None:
            shared = F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        else:
            shared = None if self.shared_experts is None else self.shared_experts(x)
        self.routed_time.add(submitted - started, 0.0)
        return PendingMoe(routed, shared, hidden_states.shape, self.routed_time)


@dataclass(frozen=True)
class PendingMoe:
    """A started MoE block: its routed experts in flight, its shared expert's output [T, H] (None: it has none)."""

    routed: Future[torch.Tensor]
    shared: torch.Tensor | None
    shape: torch.Size  # [B, L, H]
    routed_time: RoutedTime

    def finish(self) -> torch.Tensor:
        """Waits for the routed experts (raising FunctionFailed) and combines: [B, L, H]."""
        waiting = time.perf_counter()
        routed_sum = self.routed.result()  # [T, H]
        self.routed_time.add(0.0, time.perf_counter() - waiting)
        return (routed_sum if self.shared is None else routed_sum + self.shared).view(self.shape)
