"""Next-layer lookahead: the next MoE layer's router, applied to this layer's router input, guesses which
experts, and so which functions, the next layer will invoke (as FATE and Pre-gated MoE do), so that the
prewarmer wakes those at zero a layer early.

Which hidden state: x, the input of layer l's own router (its post-attention RMSNorm output), as FATE does.
It is there before layer l's routed experts are sent, so a wake has their round trip and layer l+1's
attention as lead. The state layer l+1's router will see (after layer l's MoE and layer l+1's attention,
normed by layer l+1's norm) exists only once layer l's experts are back, with one attention of lead left.
The residual stream changes little from one layer to the next, which is why the guess is good with trained
weights (FATE: about 97% on Qwen1.5-MoE); random test weights change it even less, which flatters it.

The guess changes no tensor the model computes: it reads x and the layer's choices, and calls the next
block's router module, a pure function of its input, on x.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from faasmoe.elastic.prewarm import LOG_INTERVAL_S, RateLimitedWarning
from faasmoe.model.moe_block import SplitMoeBlock
from faasmoe.planning.plan import Plan

log = logging.getLogger(__name__)

Wake = Callable[[list[str]], None]  # Prewarmer.wake: returns at once, on the trunk's thread


@dataclass
class LookaheadCounts:
    """How the guesses did, since the process started (on /metrics). Written by one trunk's thread only."""

    predicted_slots: int = 0  # guessed (token, expert) choices of the layers guessed for
    correct_slots: int = 0  # of those, chosen by the layer's router
    predicted_functions: int = 0  # (step, layer, function) guessed
    invoked_functions: int = 0  # (step, layer, function) the router's choices invoked
    foreseen_functions: int = 0  # invoked and guessed
    failures: int = 0  # guesses that raised (the step went on)


@dataclass(frozen=True)
class Guess:
    layer: int
    expert_ids: list[list[int]]  # [T][K]
    functions: set[int]  # indices into the plan's functions


class Lookahead:
    """One trunk's lookahead: the hook its MoE blocks call after their router (Trunk.look_ahead).

    Layer by layer within a step: score the guess made at the previous MoE layer against this layer's
    router, then guess the next MoE layer's choices from this layer's x and wake the functions holding them.
    The last MoE layer guesses nothing; the first is guessed by nobody (admission prewarm covers it).
    """

    def __init__(self, blocks: Sequence[SplitMoeBlock], plan: Plan, wake: Wake) -> None:
        self._next = {block.layer: following for block, following in pairwise(blocks)}
        # Per MoE layer, per expert the index of the function holding it. A guess has a few slots per token:
        # Python sets over lists cost less than the tensor operations' dispatch here.
        self._owners = {layer: owner.tolist() for layer, owner in plan.owners.items()}
        self._names = [function.name for function in plan.functions]
        self.wake = wake
        self.counts = LookaheadCounts()
        self._guess: Guess | None = None  # for the next MoE layer of the step running
        self._warnings = RateLimitedWarning(log, LOG_INTERVAL_S)

    def __call__(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> None:
        """A LookaheadHook (model/moe_block.py): x [T, H] this layer's router input, expert_ids [T, K] its choice."""
        guess, self._guess = self._guess, None  # a guess a failed step left is dropped by the next step's first layer
        try:
            if guess is not None and guess.layer == layer:
                self._score(guess, expert_ids)
            following = self._next.get(layer)
            if following is not None:
                self._guess = self._look_ahead(following, x)
        except Exception as exc:  # only an optimisation: whatever failed, the step goes on
            self.counts.failures += 1
            self._warnings.warn("the next-layer lookahead at layer %d failed: %r", layer, exc)

    def _look_ahead(self, following: SplitMoeBlock, x: torch.Tensor) -> Guess:
        _, _, expert_ids = following.gate(x)  # [T, K]
        guessed = expert_ids.tolist()
        functions = self._functions(following.layer, guessed)
        self.wake([self._names[index] for index in functions])
        return Guess(following.layer, guessed, functions)

    def _score(self, guess: Guess, expert_ids: torch.Tensor) -> None:
        chosen = expert_ids.tolist()
        invoked = self._functions(guess.layer, chosen)
        counts = self.counts
        counts.predicted_slots += sum(map(len, guess.expert_ids))
        counts.correct_slots += sum(len(set(g).intersection(c)) for g, c in zip(guess.expert_ids, chosen, strict=True))
        counts.predicted_functions += len(guess.functions)
        counts.invoked_functions += len(invoked)
        counts.foreseen_functions += len(guess.functions & invoked)

    def _functions(self, layer: int, expert_ids: list[list[int]]) -> set[int]:
        owner = self._owners[layer]
        return {owner[expert] for token in expert_ids for expert in token}
