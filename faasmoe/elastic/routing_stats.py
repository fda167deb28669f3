"""Routing statistics: the token slots the routers sent to each (MoE layer, expert), per tenant.

Two tables per tenant, each [L, E] (L MoE layers in plan order, E experts per layer):
- decayed: exponentially decayed with a half-life in wall-clock time (idle time and downtime included),
  what predictors and the routing profile learn from;
- totals: plain counts since the process started, for the ``faasmoe_routed_slots_total`` counter.

A slot is one of a token's top-k choices: a step of n tokens adds n * k slots to each MoE layer. The
engines record from their own threads; /metrics, the profile writer and predictors read from others.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

DEFAULT_HALF_LIFE_S = 600.0

Clock = Callable[[], float]  # seconds since the epoch: decayed counts outlive the process in the routing profile


class RoutingStats:
    def __init__(
        self, moe_layers: Sequence[int], num_experts: int, half_life_s: float = DEFAULT_HALF_LIFE_S,
        clock: Clock = time.time,
    ) -> None:  # fmt: skip
        if half_life_s <= 0:
            raise ValueError("the half-life must be positive")
        self.moe_layers = list(moe_layers)
        self.num_experts = num_experts
        self.half_life_s = half_life_s
        self.clock = clock
        self._row = {layer: row for row, layer in enumerate(self.moe_layers)}
        self._decayed: dict[str, torch.Tensor] = {}  # tenant -> [L, E] float64, as of _as_of[tenant]
        self._as_of: dict[str, float] = {}
        self._totals: dict[str, torch.Tensor] = {}  # tenant -> [L, E] int64
        self._lock = threading.Lock()

    def recorder(self) -> RoutingRecorder:
        """A recorder for one trunk (one engine); every recorder adds to these statistics."""
        return RoutingRecorder(self)

    def add(self, tenants: Sequence[str], slots: torch.Tensor) -> None:
        """Adds one step's ``slots`` [len(tenants), L, E] (int64 slot counts) to each tenant's tables."""
        now = self.clock()
        as_float = slots.to(torch.float64)
        with self._lock:
            for index, tenant in enumerate(tenants):
                if tenant in self._decayed:
                    self._decayed[tenant].mul_(self._factor(now - self._as_of[tenant])).add_(as_float[index])
                    self._totals[tenant].add_(slots[index])
                else:
                    self._decayed[tenant] = as_float[index].clone()
                    self._totals[tenant] = slots[index].clone()
                self._as_of[tenant] = now

    def row(self, layer: int) -> int:
        """The row of MoE layer ``layer`` in the tables."""
        return self._row[layer]

    def decayed(self) -> tuple[float, dict[str, torch.Tensor]]:
        """(now, per tenant its decayed counts [L, E] as of now), copies."""
        now = self.clock()
        with self._lock:
            tables = {t: counts * self._factor(now - self._as_of[t]) for t, counts in self._decayed.items()}
        return now, tables

    def totals(self) -> dict[str, torch.Tensor]:
        """Per tenant the slots [L, E] counted since the process started, copies."""
        with self._lock:
            return {tenant: counts.clone() for tenant, counts in self._totals.items()}

    def restore(self, as_of: float, tables: dict[str, torch.Tensor]) -> None:
        """Sets decayed counts [L, E] taken at ``as_of`` (a routing profile), before any recording; they
        decay on from ``as_of``."""
        shape = (len(self.moe_layers), self.num_experts)
        for tenant, table in tables.items():
            if tuple(table.shape) != shape:
                raise ValueError(f"tenant {tenant!r}: counts of shape {tuple(table.shape)}, expected {shape}")
        with self._lock:
            for tenant, table in tables.items():
                self._decayed[tenant] = table.to(torch.float64)
                self._as_of[tenant] = as_of
                self._totals.setdefault(tenant, torch.zeros(shape, dtype=torch.int64))

    def _factor(self, elapsed_s: float) -> float:
        # A clock that stepped back (NTP) decays nothing rather than growing the counts.
        return math.exp2(-max(elapsed_s, 0.0) / self.half_life_s)


class RoutingRecorder:
    """Attributes one trunk's routing to tenants, with one bincount per step.

    The engine calls ``start_step`` with each sequence's (tenant, new tokens) in batch order, which is
    the order the trunk concatenates their tokens in; the trunk calls ``observe`` with each MoE layer's
    router choices; the engine calls ``end_step`` once the step succeeded, which counts them all at
    once (a failed step is not counted). Nothing here changes a tensor it is given.
    """

    def __init__(self, stats: RoutingStats) -> None:
        self.stats = stats
        self._tenants: list[str] = []  # the step's distinct tenants
        self._tenant_of_token = torch.empty(0, dtype=torch.int64)  # [T] index into _tenants
        self._seen: list[tuple[int, torch.Tensor]] = []  # the step's (layer, expert_ids [T, K])

    def start_step(self, sequences: Sequence[tuple[str, int]]) -> None:
        index: dict[str, int] = {}
        owners = [index.setdefault(tenant, len(index)) for tenant, _ in sequences]
        lengths = torch.tensor([tokens for _, tokens in sequences], dtype=torch.int64)
        self._tenants = list(index)
        self._tenant_of_token = torch.repeat_interleave(torch.tensor(owners, dtype=torch.int64), lengths)
        self._seen = []

    def observe(self, layer: int, expert_ids: torch.Tensor) -> None:
        """A RoutingObserver (model/moe_block.py); kept until ``end_step``, so the hot path only appends."""
        self._seen.append((layer, expert_ids))

    def end_step(self) -> None:
        """Counts the step; a failure here is logged and loses only this step's counts, never the step."""
        seen, self._seen = self._seen, []
        if not seen:
            return
        try:
            self.stats.add(self._tenants, self._slots(seen))
        except Exception:
            log.exception("counting a step's routing failed: the routing statistics miss that step")

    def _slots(self, seen: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """[tenants, L, E]: the step's slots per tenant, MoE layer and expert, by one bincount."""
        tokens, tenants = len(self._tenant_of_token), len(self._tenants)
        layers, experts = len(self.stats.moe_layers), self.stats.num_experts
        expert_ids = torch.stack([ids for _, ids in seen])  # [L', T, K], L' the MoE layers seen
        if expert_ids.shape[1] != tokens:
            raise ValueError(f"the trunk routed {expert_ids.shape[1]} tokens; the step started with {tokens}")
        rows = torch.tensor([self.stats.row(layer) for layer, _ in seen], dtype=torch.int64)
        owner = self._tenant_of_token[None, :, None] * layers + rows[:, None, None]  # (tenant, row) as one index
        slots = torch.bincount((owner * experts + expert_ids).flatten(), minlength=tenants * layers * experts)
        return slots.view(tenants, layers, experts)
