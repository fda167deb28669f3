"""How a plan groups a model's routed experts into functions: by expert index, or by measured popularity.

Both cut the MoE layers into groups of M consecutive layers and give each group ceil(E / N) functions.

- ``contiguous``: function i of a layer group holds experts iN..iN+N-1 at each of its layers. Its name
  says the span: ``l00-e000-004`` (``l00-01-e000-004`` for two layers).
- ``popularity``: per MoE layer the experts are ranked by their routed slots summed over every tenant of
  a routing profile, hottest first, and function g of a layer group holds, at each of its layers, the
  experts of ranks gN..gN+N-1 *of that layer*. The hot experts share the first functions, which stay
  warm, and the cold ones the last, which can scale to zero. Its name says the rank: ``l00-g00`` is the
  hottest. With M > 1 layers the ranks are per layer rather than of summed popularity at one index:
  expert 3 of layer 0 and expert 3 of layer 1 are unrelated, while every token passes every layer, so a
  layer's hottest experts are invoked by the same steps as the next layer's hottest. Ties keep index
  order, so a profile without traffic groups as ``contiguous`` does.

Names are DNS-1123 once a prefix is put in front (Plan.group), and unique: a layer group's span and an
index within it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from faasmoe.errors import PlanError


class Grouping(str, enum.Enum):
    CONTIGUOUS = "contiguous"  # experts by index: a plan's behaviour before popularity existed
    POPULARITY = "popularity"  # experts by a routing profile's popularity, hottest first


@dataclass(frozen=True)
class ExpertGroup:
    """What one function holds: its name without the prefix, its layers and its (layer, expert) pairs."""

    name: str
    layers: list[int]
    experts: list[tuple[int, int]]


def group_experts(
    moe_layers: list[int],
    num_experts: int,
    experts_per_function: int,
    layers_per_function: int,
    grouping: Grouping,
    popularity: torch.Tensor | None = None,
) -> list[ExpertGroup]:
    """The functions' expert groups; ``popularity`` [len(moe_layers), E] (any non-negative weights, e.g. a
    routing profile's slots summed over tenants) is needed by, and only used by, ``popularity``."""
    if experts_per_function < 1 or layers_per_function < 1:
        raise PlanError("experts-per-function and layers-per-function must be at least 1")
    ranked = _ranked(moe_layers, num_experts, grouping, popularity)
    row = {layer: index for index, layer in enumerate(moe_layers)}
    groups = []
    for start in range(0, len(moe_layers), layers_per_function):
        layers = moe_layers[start : start + layers_per_function]
        for index, first in enumerate(range(0, num_experts, experts_per_function)):
            ranks = slice(first, first + experts_per_function)
            if ranked is None:
                block = list(range(num_experts))[ranks]
                name = f"{span('l', layers, 2)}-{span('e', block, 3)}"
                experts = [(layer, expert) for layer in layers for expert in block]
            else:
                name = f"{span('l', layers, 2)}-g{index:02d}"
                experts = [(layer, expert) for layer in layers for expert in sorted(ranked[row[layer]][ranks])]
            groups.append(ExpertGroup(name, layers, experts))
    return groups


def _ranked(
    moe_layers: list[int], num_experts: int, grouping: Grouping, popularity: torch.Tensor | None
) -> list[list[int]] | None:
    """Per MoE layer its experts hottest first (``popularity``), or None (``contiguous``)."""
    if grouping is Grouping.CONTIGUOUS:
        return None
    if popularity is None:
        raise PlanError("the popularity grouping needs a routing profile (--routing-profile FILE)")
    expected = (len(moe_layers), num_experts)
    if tuple(popularity.shape) != expected:
        raise PlanError(
            f"popularity of shape {tuple(popularity.shape)}; the model has (MoE layers, experts) {expected}"
        )
    # stable: equal popularity keeps index order
    return torch.sort(popularity, dim=-1, descending=True, stable=True).indices.tolist()


def span(tag: str, values: list[int], width: int) -> str:
    """``l00`` for one value, ``e000-004`` for a run: the first and last of ``values``."""
    first, last = values[0], values[-1]
    return f"{tag}{first:0{width}d}" if first == last else f"{tag}{first:0{width}d}-{last:0{width}d}"
