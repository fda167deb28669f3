"""The split model computes what unmodified transformers computes, whatever the granularity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from faasmoe.dispatch.executor import open_executor
from faasmoe.model.generate import generate
from faasmoe.model.sampling import SamplingParams
from faasmoe.model.split_model import SplitModel
from faasmoe.planning.export import export
from tests.reference import load_reference, reference_greedy, reference_logits

NEW_TOKENS = 16
FP32_TOLERANCE = 1e-5


def prompts_for(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def split_model(model_dir: Path, plan_dir: Path, experts_per_function: int, layers_per_function: int = 1) -> SplitModel:
    export(model_dir, plan_dir, experts_per_function, layers_per_function)
    return SplitModel.load(model_dir, plan_dir, open_executor)


def split_logits(split: SplitModel, prompts: list[list[int]]) -> list[torch.Tensor]:
    sequences = [split.trunk.new_sequence(p) for p in prompts]
    return split.trunk.step(sequences, all_logits=True)


def check_fp32_split(model_dir: Path, plan_dir: Path, experts_per_function: int, layers_per_function: int = 1) -> None:
    """Exports a contiguous plan of the given granularity and checks it (check_fp32_plan)."""
    export(model_dir, plan_dir, experts_per_function, layers_per_function)
    check_fp32_plan(model_dir, plan_dir)


def check_fp32_plan(model_dir: Path, plan_dir: Path, micro_batches: int = 1) -> None:
    """The exported plan's fp32 logits within FP32_TOLERANCE of transformers' and the same greedy tokens, for
    prompts of different lengths in one step (the reference pads them), the step in ``micro_batches``."""
    reference = load_reference(model_dir)
    split = SplitModel.load(model_dir, plan_dir, open_executor)
    split.trunk.micro_batches = micro_batches
    prompts = prompts_for(split.vocab_size, [9, 4, 13])
    for ours, theirs in zip(split_logits(split, prompts), reference_logits(reference, prompts), strict=True):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= FP32_TOLERANCE
    expected = reference_greedy(reference, prompts, NEW_TOKENS)
    assert generate(split.trunk, prompts, SamplingParams(max_new_tokens=NEW_TOKENS)) == expected


def check_bf16_split(model_dir: Path, plan_dir: Path, experts_per_function: int) -> None:
    """Split bf16 logits bit-identical to transformers' and the same greedy tokens, one prompt at a time
    (transformers' own bf16 logits change with the batch's shape)."""
    reference = load_reference(model_dir)
    split = split_model(model_dir, plan_dir, experts_per_function)
    for prompt in prompts_for(split.vocab_size, [7, 12], seed=1):
        (ours,) = split_logits(split, [prompt])
        (theirs,) = reference_logits(reference, [prompt])
        assert torch.equal(ours, theirs)
        expected = reference_greedy(reference, [prompt], NEW_TOKENS)
        assert generate(split.trunk, [prompt], SamplingParams(max_new_tokens=NEW_TOKENS)) == expected


# tiny: 12 experts per layer (5 does not divide 12); small-mixed: 8 experts, top-2, dense layers between.
CASES = [
    ("tiny_fp32", 1, 1),
    ("tiny_fp32", 5, 1),
    ("tiny_fp32", 12, 1),
    ("tiny_fp32", 5, 2),
    ("mixed_fp32", 3, 1),
    ("mixed_fp32", 8, 2),
]


@pytest.mark.parametrize(("model", "experts_per_function", "layers_per_function"), CASES)
def test_fp32_logits_and_greedy_match_transformers(request, tmp_path, model, experts_per_function, layers_per_function):
    check_fp32_split(request.getfixturevalue(model), tmp_path / "plan", experts_per_function, layers_per_function)


@pytest.mark.parametrize("experts_per_function", [1, 5, 12])
def test_bf16_logits_bit_identical_and_greedy_tokens_identical(tiny_bf16, tmp_path, experts_per_function):
    check_bf16_split(tiny_bf16, tmp_path / "plan", experts_per_function)


def test_batched_decode_equals_each_sequence_alone(tiny_fp32, tmp_path):
    split = split_model(tiny_fp32, tmp_path / "plan", 5)
    prompts = prompts_for(split.vocab_size, [3, 10, 6], seed=2)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    together = generate(split.trunk, prompts, params)
    alone = [generate(split.trunk, [p], params)[0] for p in prompts]
    assert together == alone


def test_trunk_holds_no_routed_expert_weights(tiny_fp32, tmp_path):
    split = split_model(tiny_fp32, tmp_path / "plan", 4)
    names = [name for name, _ in split.trunk.model.named_parameters()]
    assert names and not any(".experts." in name for name in names)
    assert not any(p.is_meta for p in split.trunk.model.parameters())
