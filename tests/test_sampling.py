"""Every sampling parameter the API accepts is computable: the sampler never raises and returns a token id.

Parameters are drawn widely (subnormal temperatures and top_p, the seed range's ends) and kept only if
the request schema accepts them, so the property covers exactly what a tenant can send.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from faasmoe.model.sampling import SEED_MAX, SEED_MIN, Sampler, SamplingParams
from faasmoe.server.protocol import CompletionRequest

TINY = [5e-324, 1e-310, 1e-300, 1e-45, 1e-30]  # subnormal and near-zero, as float64 and float32 see them

temperatures = st.one_of(st.floats(0.0, 2.0), st.sampled_from([0.0, *TINY, 2.0]))
top_ps = st.one_of(st.floats(0.0, 1.0, exclude_min=True), st.sampled_from([*TINY, 1.0]))
seeds = st.one_of(st.none(), st.integers(SEED_MIN, SEED_MAX), st.sampled_from([SEED_MIN, -1, 0, SEED_MAX]))
logit_rows = st.integers(1, 64).flatmap(
    lambda vocab: st.lists(st.floats(-3e4, 3e4, width=32), min_size=vocab, max_size=vocab)
)


def accepted(temperature: float, top_p: float, seed: int | None) -> SamplingParams:
    """The request schema's validation, then the parameters as the server hands them to the engine."""
    request = CompletionRequest.model_validate(
        {"model": "m", "prompt": [1], "temperature": temperature, "top_p": top_p, "seed": seed}
    )
    return SamplingParams(temperature=request.temperature, top_p=request.top_p, seed=request.seed)


@settings(max_examples=200, deadline=None)
@given(temperatures, top_ps, seeds, logit_rows, st.sampled_from([torch.float32, torch.bfloat16]))
def test_any_accepted_parameters_sample_a_valid_token(temperature, top_p, seed, row, dtype):
    logits = torch.tensor(row, dtype=torch.float32).to(dtype)
    token = Sampler(accepted(temperature, top_p, seed))(logits)
    assert 0 <= token < len(row)
    if temperature == 0:
        assert logits[token] == logits.max()
    elif temperature <= 1e-300 or top_p <= 1e-300:
        # A temperature so small only the maxima keep weight, or a nucleus of the likeliest alone: the token
        # chosen weighs as much as the likeliest in float64 (logits 1e-38 apart tie at temperature 1).
        gap = (logits.max().double() - logits[token].double()) / temperature
        assert torch.exp(-gap) == 1.0


@settings(max_examples=50, deadline=None)
@given(seeds.filter(lambda s: s is not None), logit_rows)
def test_a_seed_makes_sampling_repeatable(seed, row):
    logits = torch.tensor(row)
    params = accepted(1.0, 0.9, seed)
    assert [Sampler(params)(logits) for _ in range(2)] == [Sampler(params)(logits)] * 2


@pytest.mark.parametrize(
    "fields",
    [
        {"seed": SEED_MAX + 1},
        {"seed": SEED_MIN - 1},
        {"top_p": 0.0},
        {"temperature": -1e-300},
        {"temperature": float("nan")},
        {"top_p": float("nan")},
        {"temperature": float("inf")},
    ],  # fmt: skip
)
def test_what_the_sampler_cannot_compute_is_refused(fields):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": [1], **fields})
