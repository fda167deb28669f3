"""The routed-expert maths, the one copy used by the in-process executor and by every function.

Shape legend:
    T  tokens (rows) in a request       K  top-k slots per token (unused slots hold expert id -1)
    S  = T * K token-expert slots       H  hidden size      I  expert intermediate size

The summation order follows transformers' experts module (the same for every family in
faasmoe/model/families.py) so results match it bit for bit: one fused gate-and-up projection per
expert (``ExpertMlp``: GatedMlp's [gate; up] for every family but gpt_oss, ClampedSwigluMlp's for gpt_oss),
each slot weighted in the routing weights' dtype promoted with the model's (the model dtype for
qwen2_moe and qwen3_moe, whose routers cast the weights to it; float32 for mixtral, whose router keeps
them so), and the sum over a token's slots done as view(T, K, H).sum(1). Partial sums are returned in
float32 so that adding the partials of several functions rounds only once, as the single-process sum does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
import torch.nn.functional as F

from faasmoe.errors import BadRequest

NO_EXPERT = -1  # expert id of a slot this request does not ask for
PARTIAL_DTYPE = torch.float32


@dataclass(frozen=True)
class ExpertWeights:
    """One routed expert in its ExpertMlp's layout: GatedMlp's W_gate_up [2I, H] (gate rows first) and W_down
    [H, I]; ClampedSwigluMlp's (gpt_oss's own) W_gate_up [H, 2I] (gate and up in alternate columns), W_down
    [I, H] and the biases of both."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None  # [2I]
    down_bias: torch.Tensor | None = None  # [H]

    @classmethod
    def from_projections(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> ExpertWeights:
        return cls(gate_up=torch.cat([gate, up], dim=0), down=down)

    def nbytes(self) -> int:
        tensors = (self.gate_up, self.down, self.gate_up_bias, self.down_bias)
        return sum(t.nbytes for t in tensors if t is not None)


@dataclass(frozen=True)
class GatedMlp:
    """transformers' default experts (every family but gpt_oss): act(gate) * up from one [gate; up] projection,
    then down; no biases."""

    hidden_act: str
    kind: ClassVar[str] = "gated"
    has_bias: ClassVar[bool] = False

    @cached_property
    def act_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return activation(self.hidden_act)

    def hidden_size(self, w: ExpertWeights) -> int:
        return w.gate_up.shape[1]

    def __call__(self, x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        """[n, H] -> [n, H]"""
        gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)  # [n, I] each
        return F.linear(self.act_fn(gate) * up, w.down)


@dataclass(frozen=True)
class ClampedSwigluMlp:
    """gpt_oss's experts (GptOssExperts): each projection x @ W, then its bias added, as transformers' experts
    module computes it; between them the clamped SwiGLU, op for op as GptOssExperts._apply_gate."""

    alpha: float  # config.swiglu_alpha
    limit: float  # config.swiglu_limit
    kind: ClassVar[str] = "clamped_swiglu"
    has_bias: ClassVar[bool] = True

    def hidden_size(self, w: ExpertWeights) -> int:
        return w.gate_up.shape[0]

    def __call__(self, x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        """[n, H] -> [n, H]"""
        gate_up = x @ w.gate_up + w.gate_up_bias  # [n, 2I]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]  # [n, I] each
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return ((up + 1) * glu) @ w.down + w.down_bias


ExpertMlp = GatedMlp | ClampedSwigluMlp


@dataclass(frozen=True)
class ExpertBatch:
    """Rows of hidden states with the routed experts each row asks for, possibly from several layers."""

    hidden: torch.Tensor  # [T, H] model dtype
    layer_ids: torch.Tensor  # [T] int64
    expert_ids: torch.Tensor  # [T, K] int64, NO_EXPERT where not asked
    weights: torch.Tensor  # [T, K] routing weights, model dtype or float32


class ExpertSet:
    """The experts one function (or one process) holds, keyed by (layer, expert)."""

    def __init__(self, experts: dict[tuple[int, int], ExpertWeights], mlp: ExpertMlp | str) -> None:
        """``mlp``: the experts' maths, or the activation name of GatedMlp's."""
        self.experts = experts
        self.mlp = GatedMlp(mlp) if isinstance(mlp, str) else mlp
        first = next(iter(experts.values()))
        self.hidden_size = self.mlp.hidden_size(first)
        self.dtype = first.gate_up.dtype

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self.experts

    def nbytes(self) -> int:
        return sum(w.nbytes() for w in self.experts.values())

    def partial_sum(self, batch: ExpertBatch) -> torch.Tensor:
        """Returns sum_k w_k * expert_k(x) over the slots asked of this set: [T, H] float32."""
        self.check(batch)
        T, K = batch.expert_ids.shape
        H = self.hidden_size
        slot_experts = batch.expert_ids.reshape(-1)  # [S]
        slot_layers = batch.layer_ids.repeat_interleave(K)  # [S]
        slot_weights = batch.weights.reshape(-1)  # [S]
        slot_dtype = torch.promote_types(self.dtype, batch.weights.dtype)  # of expert output * weight
        weighted = batch.hidden.new_zeros(T * K, H, dtype=slot_dtype)  # [S, H]
        for layer, expert in self._asked(slot_layers, slot_experts):
            slots = torch.nonzero((slot_experts == expert) & (slot_layers == layer)).squeeze(1)
            out = self.mlp(batch.hidden[slots // K], self.experts[(layer, expert)])  # [n, H]
            weighted[slots] = out * slot_weights[slots, None]
        return weighted.view(T, K, H).sum(dim=1, dtype=PARTIAL_DTYPE)

    def check(self, batch: ExpertBatch) -> None:
        """Raises BadRequest naming the first thing wrong with a batch for this set."""
        hidden, ids = batch.hidden, batch.expert_ids
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise BadRequest(f"hidden must be [T, {self.hidden_size}], got {list(hidden.shape)}")
        if hidden.dtype != self.dtype:
            raise BadRequest(f"hidden must be {self.dtype}, got {hidden.dtype}")
        T = hidden.shape[0]
        if ids.dim() != 2 or ids.shape[0] != T or batch.weights.shape != ids.shape:
            raise BadRequest(
                f"expert_ids and weights must both be [T={T}, K], got {list(ids.shape)} and {list(batch.weights.shape)}"
            )
        if batch.layer_ids.shape != (T,):
            raise BadRequest(f"layer_ids must be [T={T}], got {list(batch.layer_ids.shape)}")
        if ids.dtype != torch.int64 or batch.layer_ids.dtype != torch.int64:
            raise BadRequest("expert_ids and layer_ids must be int64")
        if batch.weights.dtype not in (self.dtype, torch.float32):
            raise BadRequest(f"weights must be {self.dtype} or torch.float32, got {batch.weights.dtype}")
        slot_layers = batch.layer_ids.repeat_interleave(ids.shape[1])
        for layer, expert in self._asked(slot_layers, ids.reshape(-1)):
            if (layer, expert) not in self.experts:
                raise BadRequest(f"expert {expert} of layer {layer} is not held here")

    @staticmethod
    def _asked(slot_layers: torch.Tensor, slot_experts: torch.Tensor) -> list[tuple[int, int]]:
        asked = slot_experts != NO_EXPERT
        pairs = torch.stack([slot_layers[asked], slot_experts[asked]], dim=1)
        return [(int(layer), int(expert)) for layer, expert in torch.unique(pairs, dim=0).tolist()]


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The expert activation by its config name.

    silu is F.silu, exactly what transformers' ACT2FN["silu"] calls, so results are identical; transformers
    is imported only for other activations because it adds about 1.5 s to a function's cold start.
    """
    if name == "silu":
        return F.silu
    from transformers.activations import ACT2FN

    return ACT2FN[name]
