"""A routing profile as the planner reads it: the file, checked against the model, its popularity and its load.

`faasmoe serve --routing-profile FILE` writes the profile (faasmoe/elastic/routing_profile.py; format in
docs/elasticity.md). Serving treats it as a cache and starts afresh from a corrupt one; planning from it
is what the user asked for, so here a missing, corrupt or other model's profile is an error.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from faasmoe.elastic.routing_profile import RoutingProfile, RoutingProfileError, read_profile_file
from faasmoe.elastic.routing_stats import RoutingStats
from faasmoe.planning.plan import ModelShape


def read_profile(path: Path, shape: ModelShape) -> RoutingProfile:
    """The profile at ``path``; raises RoutingProfileError unless it is a readable profile of ``shape``'s model."""
    try:
        profile = read_profile_file(path)
    except FileNotFoundError:
        raise RoutingProfileError(
            f"routing profile {path} does not exist: record one with `faasmoe serve --routing-profile {path}`"
        ) from None
    made_for = (profile.moe_layers, profile.num_experts)
    model = (shape.moe_layers, shape.num_experts)
    if made_for != model:
        raise RoutingProfileError(
            f"routing profile {path} ({profile.model!r}) was recorded on a model with MoE layers {made_for[0]} of "
            f"{made_for[1]} experts; this model has MoE layers {model[0]} of {model[1]} experts"
        )
    return profile


def popularity(profile: RoutingProfile) -> torch.Tensor:
    """[MoE layers, E]: every tenant's decayed slots per expert, summed."""
    shape = (len(profile.moe_layers), profile.num_experts)
    return sum(profile.tables().values(), torch.zeros(shape, dtype=torch.float64))


def frozen_stats(profile: RoutingProfile) -> RoutingStats:
    """The profile as routing statistics whose clock stands at ``decayed_to``: read, they decay no further."""
    stats = RoutingStats(profile.moe_layers, profile.num_experts, profile.half_life_s, clock=lambda: profile.decayed_to)
    stats.restore(profile.decayed_to, profile.tables())
    return stats


def tenant_token_rates(profile: RoutingProfile, top_k: int) -> dict[str, float]:
    """Per tenant with traffic, the token rate its decayed counts stand for.

    A steady rate of r slots/s decayed with half-life h settles at C = r h / ln 2 slots, and a token adds
    k slots to every MoE layer, so a tenant's rate is its mean slots per layer x ln 2 / (h k). A tenant
    whose traffic started less than a few half-lives before ``decayed_to`` is underestimated, and one
    that stopped is still counted as its decayed remainder.
    """
    rates = {}
    for tenant, table in profile.tables().items():
        slots = float(table.sum(-1).mean())
        if slots > 0:
            rates[tenant] = slots * math.log(2) / (profile.half_life_s * top_k)
    return rates
