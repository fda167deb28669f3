"""Two micro-batches per step (dual-batch overlap, Trunk.step): exact against transformers in-process and
through real function processes, and one half's routed experts are in flight while the other half computes."""

from __future__ import annotations

import itertools
from concurrent.futures import Future

import pytest
import torch

from faasmoe.dispatch.executor import open_executor
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.model.generate import generate
from faasmoe.model.moe_block import ExpertExecutor, RoutedTokens
from faasmoe.model.sampling import SamplingParams
from faasmoe.model.split_model import SplitModel
from faasmoe.model.trunk import _runs, _spans
from faasmoe.planning.export import export
from tests.reference import load_reference, reference_greedy, reference_logits
from tests.test_remote_e2e import PROMPTS, deploy, remote_model
from tests.test_split_exactness import FP32_TOLERANCE, check_fp32_plan

NEW_TOKENS = 8


def test_micro_batches_are_runs_of_whole_sequences_with_about_equal_tokens():
    lengths = [9, 4, 13]
    runs = _runs(lengths, 2)
    assert runs == [range(0, 2), range(2, 3)]
    assert [sum(lengths[i] for i in run) for run in runs] == [13, 13]  # rows 0:13 and 13:26 of the step
    assert _spans([lengths[i] for i in runs[0]]) == [slice(0, 9), slice(9, 13)]  # rows within the run
    assert _runs([1] * 6, 2) == [range(0, 3), range(3, 6)]
    assert _runs([1] * 6, 1) == [range(0, 6)]
    assert _runs([5], 2) == [range(0, 1)]  # one sequence is never split


@pytest.mark.parametrize("model", ["tiny_fp32", "mixed_fp32"])  # mixed: dense MLP layers between the MoE ones
def test_two_micro_batches_match_transformers(request, tmp_path, model):
    model_dir = request.getfixturevalue(model)
    export(model_dir, tmp_path / "plan", 3)
    check_fp32_plan(model_dir, tmp_path / "plan", micro_batches=2)


def test_two_micro_batches_through_functions_match_transformers(tiny_fp32, tmp_path):
    export(tiny_fp32, tmp_path / "plan", 5)
    reference = load_reference(tiny_fp32)
    with GatewayProcess() as gateway:  # calls straight to warm replicas (the default) after each first one
        deploy(gateway, tmp_path / "plan")
        split = remote_model(tiny_fp32, tmp_path / "plan", gateway)
        split.trunk.micro_batches = 2
        try:
            sequences = [split.trunk.new_sequence(p) for p in PROMPTS]
            ours = split.trunk.step(sequences, all_logits=True)
            params = SamplingParams(max_new_tokens=NEW_TOKENS)
            tokens = generate(split.trunk, PROMPTS, params)
        finally:
            split.close()
    for mine, theirs in zip(ours, reference_logits(reference, PROMPTS), strict=True):
        assert (mine - theirs).abs().max().item() <= FP32_TOLERANCE
    assert tokens == reference_greedy(reference, PROMPTS, NEW_TOKENS)


class RecordingExecutor:
    """The real executor, with each submit and each wait for a result written down in order."""

    def __init__(self, inner: ExpertExecutor) -> None:
        self.inner = inner
        self.events: list[tuple[str, int, int]] = []  # (submit | wait, layer, tokens)

    def submit(self, tokens: RoutedTokens) -> Future[torch.Tensor]:
        self.events.append(("submit", tokens.layer, len(tokens.hidden)))
        recorded = RecordedFuture(self.events, ("wait", tokens.layer, len(tokens.hidden)))
        self.inner.submit(tokens).add_done_callback(lambda done: recorded.set_result(done.result()))
        return recorded

    def close(self) -> None:
        self.inner.close()


class RecordedFuture(Future):
    def __init__(self, events: list, event: tuple[str, int, int]) -> None:
        super().__init__()
        self.events, self.event = events, event

    def result(self, timeout: float | None = None) -> torch.Tensor:
        self.events.append(self.event)
        return super().result(timeout)


def test_one_half_is_sent_before_the_other_half_waits(tiny_fp32, tmp_path):
    export(tiny_fp32, tmp_path / "plan", 4)
    recorders: list[RecordingExecutor] = []

    def opener(plan, plan_dir):
        recorders.append(RecordingExecutor(open_executor(plan, plan_dir)))
        return recorders[-1]

    split = SplitModel.load(tiny_fp32, tmp_path / "plan", opener)
    split.trunk.micro_batches = 2
    split.trunk.step([split.trunk.new_sequence([3 + i, 7]) for i in range(4)])  # 8 tokens: 4 per half
    layers = [block.layer for block in split.trunk.moe_blocks]
    expected = [("submit", layers[0], 4), ("submit", layers[0], 4)]
    for previous, layer in itertools.pairwise(layers):  # each half waits for its layer just before its next
        expected += [("wait", previous, 4), ("submit", layer, 4), ("wait", previous, 4), ("submit", layer, 4)]
    expected += [("wait", layers[-1], 4), ("wait", layers[-1], 4)]
    assert recorders[0].events == expected
