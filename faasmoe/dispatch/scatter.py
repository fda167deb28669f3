"""Scatter/gather over a plan: route -> group tokens by function -> transport -> combine.

Shape legend: T tokens, K top-k slots, H hidden, F functions called this layer, R_f rows sent to f.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch

from faasmoe.experts.compute import NO_EXPERT, PARTIAL_DTYPE, ExpertBatch
from faasmoe.model.moe_block import RoutedTokens
from faasmoe.planning.plan import FunctionSpec, Plan


@dataclass(frozen=True)
class FunctionCall:
    """The rows of one layer routed to one function."""

    function: FunctionSpec
    rows: torch.Tensor  # [R_f] indices into the layer's T tokens
    batch: ExpertBatch  # R_f rows, with slots of other functions' experts set to NO_EXPERT

    def split(self, parts: int) -> list[FunctionCall]:
        """This call as at most ``parts`` calls, each for a share of the experts it asks for (one per ready
        replica of a hot function, faasmoe/elastic/hot_replicas.py). Each expert still computes all of its rows
        in one call, and gather adds the partials, as at a finer granularity: the sums stay bit for bit."""
        ids = self.batch.expert_ids  # [R_f, K]
        experts = torch.unique(ids[ids != NO_EXPERT])
        if min(parts, len(experts)) <= 1:
            return [self]
        calls = []
        for share in experts.tensor_split(min(parts, len(experts))):
            mine = torch.isin(ids, share)  # [R_f, K]
            rows = torch.nonzero(mine.any(dim=1)).squeeze(1)
            batch = ExpertBatch(
                hidden=self.batch.hidden[rows],
                layer_ids=self.batch.layer_ids[rows],
                expert_ids=torch.where(mine[rows], ids[rows], NO_EXPERT),
                weights=self.batch.weights[rows],
            )
            calls.append(FunctionCall(self.function, self.rows[rows], batch))
        return calls


class Transport(Protocol):
    def send(self, calls: list[FunctionCall]) -> Future[list[torch.Tensor]]:
        """Runs every call (concurrently where it can); yields each call's [R_f, H] float32 partial sum."""
        ...

    def close(self) -> None: ...


class DispatchExecutor:
    """The ExpertExecutor for a plan: one call per function that holds an expert the layer's tokens chose, or
    one per ready replica of a function that has several (``replicas``: none, every function has one)."""

    def __init__(self, plan: Plan, transport: Transport, replicas: Callable[[str], int] | None = None) -> None:
        self.plan = plan
        self.transport = transport
        self.replicas = replicas

    def submit(self, tokens: RoutedTokens) -> Future[torch.Tensor]:
        calls = self.scatter(tokens)
        partials = self.transport.send(calls)
        return _then(partials, lambda results: self.gather(tokens, calls, results))

    def close(self) -> None:
        self.transport.close()

    def scatter(self, tokens: RoutedTokens) -> list[FunctionCall]:
        owner = self.plan.owners[tokens.layer][tokens.expert_ids]  # [T, K] function index per slot
        calls = []
        for index in torch.unique(owner).tolist():
            mine = owner == index  # [T, K]
            rows = torch.nonzero(mine.any(dim=1)).squeeze(1)  # [R_f]
            batch = ExpertBatch(
                hidden=tokens.hidden[rows],
                layer_ids=torch.full((len(rows),), tokens.layer, dtype=torch.int64),
                expert_ids=torch.where(mine[rows], tokens.expert_ids[rows], NO_EXPERT),
                weights=tokens.weights[rows],
            )
            call = FunctionCall(self.plan.functions[index], rows, batch)
            calls.extend(call.split(self.replicas(call.function.name)) if self.replicas else [call])
        return calls

    @staticmethod
    def gather(tokens: RoutedTokens, calls: list[FunctionCall], partials: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(tokens.hidden.shape, dtype=PARTIAL_DTYPE)  # [T, H]
        for call, partial in zip(calls, partials, strict=True):
            out.index_add_(0, call.rows, partial)
        return out.to(tokens.hidden.dtype)


def _then(future: Future, fn: Callable) -> Future:
    """A future for fn(result of future); exceptions pass through."""
    chained: Future = Future()

    def done(f: Future) -> None:
        try:
            chained.set_result(fn(f.result()))
        except BaseException as exc:  # the caller re-raises it from result()
            chained.set_exception(exc)

    future.add_done_callback(done)
    return chained
