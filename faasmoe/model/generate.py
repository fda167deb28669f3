"""Batch generation through the split trunk: all sequences advance together, one step at a time."""

from __future__ import annotations

from faasmoe.model.sampling import Sampler, SamplingParams
from faasmoe.model.trunk import Trunk


def generate(trunk: Trunk, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Returns the generated token ids of each prompt (stop tokens included, as OpenAI counts them)."""
    sequences = [trunk.new_sequence(prompt) for prompt in prompts]
    samplers = [Sampler(params) for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    while active and params.max_new_tokens > 0:
        logits = trunk.step([sequences[i] for i in active])
        still = []
        for i, row in zip(active, logits, strict=True):
            token = samplers[i](row)
            outputs[i].append(token)
            if params.finish(token, len(outputs[i])) is None:
                sequences[i].new_tokens = [token]
                still.append(i)
        active = still
    return outputs
