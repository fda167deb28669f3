"""Choosing the next token from logits: greedy, temperature, top-p; seeded per sequence.

Any temperature > 0 and top_p > 0 is computable: the logits are shifted so the likeliest is 0 and
scaled in float64, so the likeliest token keeps weight exp(0) = 1 however small the temperature
(a tiny one samples among the tied maxima, i.e. approaches greedy), and the nucleus always keeps
the likeliest token however small top_p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The seeds torch.Generator.manual_seed takes (negative ones are mapped onto the unsigned range).
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None  # SEED_MIN..SEED_MAX
    stop_token_ids: tuple[int, ...] = ()

    def finish(self, token: int, produced: int) -> str | None:
        """Why a sequence ends at ``token``, its ``produced``-th output: "stop", "length", or None (it goes on).

        A stop token counts as an output token, as OpenAI counts it.
        """
        if token in self.stop_token_ids:
            return "stop"
        if produced >= self.max_new_tokens:
            return "length"
        return None


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [V] -> the chosen token id."""
        p = self.params
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        shifted = logits.double() - logits.max().double()  # the likeliest is 0: its weight is 1 at any temperature
        probs = torch.softmax(shifted / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < p.top_p
            keep[0] = True  # the nucleus holds at least the likeliest token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))
