"""The next-layer lookahead (faasmoe/elastic/lookahead.py): its guess is the next router on this layer's router
input, it changes no logit, and through the real gateway (embedded, with its function processes, behind a
recording proxy) it wakes the next layer's functions before the forward pass invokes them, failing nothing."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import torch

from faasmoe.dispatch.executor import open_executor
from faasmoe.elastic.lookahead import Lookahead
from faasmoe.elastic.prewarm import Prewarmer, WakeOutcome
from faasmoe.model.generate import generate
from faasmoe.model.init_model import InitModelOptions, init_model
from faasmoe.model.sampling import SamplingParams
from faasmoe.model.split_model import SplitModel
from faasmoe.model.trunk import Trunk
from faasmoe.planning.export import export
from faasmoe.planning.plan import Plan
from faasmoe.process import wait_until
from faasmoe.server.metrics import LookaheadHits, Metrics
from faasmoe.server.settings import ServeSettings
from tests.app_server import AppServer, serving
from tests.reference import load_reference, reference_greedy, reference_logits
from tests.support.recording_proxy import ANSWERED, SENT, RecordingProxy
from tests.test_prewarm import (
    INVOKE_PATH,
    NEW_TOKENS,
    OUTCOMES_WITHIN_S,
    PROMPT,
    SCALE_PATH,
    STATUS_PATH,
    Cluster,
    complete,
    first_index,
    paths,
    remote_split,
    scale,
    wake_counts,
)
from tests.test_prewarm import cluster as prewarm_cluster  # noqa: F401  (a fixture, registered by this name)
from tests.test_remote_e2e import replicas
from tests.test_serve import METRICS_KEY, metric, read_metrics
from tests.test_split_exactness import prompts_for

GREEDY_TOKENS = 8


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Cluster:
    """test_prewarm's deployment: 2 MoE layers x 2 functions, at zero soon after their last use, and decoys."""
    return request.getfixturevalue("prewarm_cluster")


@pytest.fixture(scope="module")
def mixed_4_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small-mixed with 4 layers: MoE layers 1 and 3, with a dense layer between them."""
    options = InitModelOptions(preset="small-mixed", layers=4, dtype="float32", seed=8)
    return init_model(tmp_path_factory.mktemp("mixed-4") / "model", options)


class Woken:
    """The lookahead's wake: what it asked for, call by call (a Prewarmer's ``wake`` in the control plane)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, functions: list[str]) -> None:
        self.calls.append(sorted(functions))


@contextmanager
def looking_ahead(trunk: Trunk, lookahead: Lookahead | None) -> Iterator[None]:
    trunk.look_ahead(lookahead)
    try:
        yield
    finally:
        trunk.look_ahead(None)


@contextmanager
def router_inputs(trunk: Trunk) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """Each MoE block's input x [T, H] as it runs, in order: (layer, x)."""
    seen: list[tuple[int, torch.Tensor]] = []
    handles = [
        block.register_forward_pre_hook(lambda block, args: seen.append((block.layer, args[0].flatten(0, 1).clone())))
        for block in trunk.moe_blocks
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def steps(trunk: Trunk, prompts: list[list[int]], count: int) -> list[torch.Tensor]:
    """``count`` greedy steps (a prefill, then decodes): each step's logits [B, V]."""
    states = [trunk.new_sequence(prompt) for prompt in prompts]
    out = []
    for _ in range(count):
        rows = torch.stack(trunk.step(states))
        out.append(rows)
        for state, row in zip(states, rows, strict=True):
            state.new_tokens = [int(row.argmax())]
    return out


def local_split(model_dir: Path, plan_dir: Path, experts_per_function: int) -> SplitModel:
    export(model_dir, plan_dir, experts_per_function)
    return SplitModel.load(model_dir, plan_dir, open_executor)


def test_looking_ahead_changes_no_logit_and_bf16_still_matches_transformers(tiny_bf16: Path, tmp_path: Path):
    split = local_split(tiny_bf16, tmp_path / "plan", experts_per_function=1)
    prompts = prompts_for(split.vocab_size, [7, 12, 3], seed=5)
    plain = steps(split.trunk, prompts, 4)
    lookahead = Lookahead(split.trunk.moe_blocks, split.plan, Woken())
    with looking_ahead(split.trunk, lookahead):
        ahead = steps(split.trunk, prompts, 4)
        assert all(torch.equal(before, after) for before, after in zip(plain, ahead, strict=True))

        reference = load_reference(tiny_bf16)
        for prompt in prompts:
            (ours,) = split.trunk.step([split.trunk.new_sequence(prompt)], all_logits=True)
            (theirs,) = reference_logits(reference, [prompt])
            assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
            expected = reference_greedy(reference, [prompt], GREEDY_TOKENS)
            assert generate(split.trunk, [prompt], SamplingParams(max_new_tokens=GREEDY_TOKENS)) == expected
    assert lookahead.counts.predicted_slots > 0 and lookahead.counts.failures == 0


@pytest.mark.parametrize("model", ["tiny_fp32", "mixed_4_layers"])
def test_the_guess_is_the_next_routers_choice_on_this_layers_router_input(request, tmp_path: Path, model: str):
    # One expert per function: the functions woken are the experts guessed.
    split = local_split(request.getfixturevalue(model), tmp_path / "plan", experts_per_function=1)
    trunk, plan = split.trunk, split.plan
    blocks = {block.layer: block for block in trunk.moe_blocks}
    moe_layers = plan.model.moe_layers
    assert len(moe_layers) >= 2
    woken = Woken()
    lookahead = Lookahead(trunk.moe_blocks, plan, woken)
    chosen: list[tuple[int, torch.Tensor]] = []
    trunk.observe_routing(lambda layer, expert_ids: chosen.append((layer, expert_ids.clone())))
    try:
        with looking_ahead(trunk, lookahead), router_inputs(trunk) as inputs:
            steps(trunk, prompts_for(split.vocab_size, [9, 4], seed=6), 3)
    finally:
        trunk.observe_routing(None)

    # By hand: layer l's input through the next MoE layer's router, in the order the layers ran.
    by_hand, slots, correct, invoked, foreseen = [], 0, 0, 0, 0
    for (layer, x), (following, expert_ids) in zip(inputs, chosen[1:], strict=False):
        if layer == moe_layers[-1]:
            continue  # the last MoE layer guesses nothing; the next entry is the next step's first layer
        assert following == moe_layers[moe_layers.index(layer) + 1]
        with torch.inference_mode():
            _, _, guessed = blocks[following].gate(x)
        functions = sorted({plan.functions[int(i)].name for i in plan.owners[following][guessed].flatten()})
        by_hand.append(functions)
        slots += guessed.numel()
        correct += sum(len(set(g.tolist()) & set(c.tolist())) for g, c in zip(guessed, expert_ids, strict=True))
        used = {plan.functions[int(i)].name for i in plan.owners[following][expert_ids].flatten()}
        invoked += len(used)
        foreseen += len(used & set(functions))
    assert len(by_hand) == 3 * (len(moe_layers) - 1)
    assert woken.calls == by_hand
    counts = lookahead.counts
    assert (counts.predicted_slots, counts.correct_slots) == (slots, correct)
    assert (counts.predicted_functions, counts.invoked_functions) == (sum(map(len, by_hand)), invoked)
    assert counts.foreseen_functions == foreseen and counts.failures == 0


def test_a_failing_wake_fails_no_step_and_is_counted(tiny_fp32: Path, tmp_path: Path, caplog):
    split = local_split(tiny_fp32, tmp_path / "plan", experts_per_function=5)
    prompt = prompts_for(split.vocab_size, [9], seed=7)
    params = SamplingParams(max_new_tokens=GREEDY_TOKENS)
    expected = generate(split.trunk, prompt, params)

    def broken(functions: list[str]) -> None:
        raise RuntimeError("the gateway connection is closed")

    lookahead = Lookahead(split.trunk.moe_blocks, split.plan, broken)
    with caplog.at_level(logging.WARNING), looking_ahead(split.trunk, lookahead):
        assert generate(split.trunk, prompt, params) == expected
    # One guess per step (2 MoE layers), each failed; warned once, not once a step.
    assert lookahead.counts.failures == GREEDY_TOKENS
    assert lookahead.counts.predicted_slots == 0
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "lookahead at layer 0 failed" in caplog.records[0].message

    metrics = Metrics()
    metrics.count_lookahead([lookahead.counts])
    assert metrics.registry.get_sample_value("faasmoe_lookahead_failures_total") == GREEDY_TOKENS
    assert set(LookaheadHits.HELP) == set(vars(lookahead.counts))  # every count is on /metrics


def layer_functions(plan: Plan, layer: int) -> list[str]:
    return [f.name for f in plan.functions if layer in f.layers]


def prefill_guess(cluster: Cluster) -> set[str]:
    """The second MoE layer's functions the lookahead guesses from the prompt, by hand: layer 0's router input
    depends on no routed expert, so in-process experts give the served trunk's."""
    split = SplitModel.load(cluster.model, cluster.work / "plan", open_executor)
    try:
        first, second = split.trunk.moe_blocks
        with router_inputs(split.trunk) as inputs:
            split.trunk.step([split.trunk.new_sequence(PROMPT)])
        with torch.inference_mode():
            _, _, guessed = second.gate(inputs[0][1])
        return {split.plan.functions[int(i)].name for i in split.plan.owners[second.layer][guessed].flatten()}
    finally:
        split.close()


@contextmanager
def serve_looking_ahead(cluster: Cluster, proxy: RecordingProxy) -> Iterator[AppServer]:
    """`--prewarm predicted` with a threshold no admission prediction reaches: only the lookahead wakes."""
    settings = ServeSettings(model=cluster.model, plan=cluster.work / "plan", tenants=cluster.work / "t.yaml",
                             gateway=proxy.url, metrics_key=METRICS_KEY, prewarm="predicted",
                             prewarm_threshold=1.0)  # fmt: skip
    with serving(settings) as (_, server):
        yield server


def test_after_scale_to_zero_the_lookahead_wakes_the_next_layer_before_the_forward_pass_invokes_it(cluster: Cluster):
    first_layer, second_layer = cluster.plan.model.moe_layers
    guessed = prefill_guess(cluster)
    assert guessed
    with RecordingProxy(cluster.gateway.url) as proxy, serve_looking_ahead(cluster, proxy) as server:
        cluster.wait_until_plan_at_zero()
        mark = len(proxy.events)
        assert complete(server) == cluster.expected
        events = proxy.since(mark)

        # Admission woke nothing (it would have asked about the first layer's functions too): the lookahead did.
        asked = set(paths(events, "/system/"))
        assert not {STATUS_PATH + name for name in layer_functions(cluster.plan, first_layer)} & asked
        assert {STATUS_PATH + name for name in guessed} <= asked
        assert all(name in layer_functions(cluster.plan, second_layer) for name in guessed)
        invoked = [name for name in guessed if first_index(events, SENT, "POST", INVOKE_PATH + name) is not None]
        assert invoked, f"no guessed function was invoked: {paths(events, INVOKE_PATH)}"
        for name in invoked:
            scaled = first_index(events, ANSWERED, "POST", SCALE_PATH + name)
            assert scaled is not None, f"{name} was invoked but never woken: {paths(events, '/system/')}"
            assert events[scaled].status == 202
            assert scaled < first_index(events, SENT, "POST", INVOKE_PATH + name), f"{name} was woken too late"

        page = read_metrics(server.url)
        top_k = cluster.plan.model.num_experts_per_tok
        # One guessed layer; the prompt's tokens, then one per decode step (the last token is not fed back).
        assert metric(page, "faasmoe_lookahead_predicted_slots_total") == (len(PROMPT) + NEW_TOKENS - 1) * top_k
        assert 0 < metric(page, "faasmoe_lookahead_correct_slots_total") <= (len(PROMPT) + NEW_TOKENS - 1) * top_k
        foreseen = metric(page, "faasmoe_lookahead_foreseen_functions_total")
        invoked_total = metric(page, "faasmoe_lookahead_invoked_functions_total")
        assert 0 < foreseen <= invoked_total
        assert metric(page, "faasmoe_lookahead_failures_total") == 0
        assert all(metric(page, "faasmoe_prewarm_calls_total", function=n, outcome="scaled") == 1 for n in invoked)


def test_a_wrong_guess_wakes_only_what_it_names_and_fails_no_request(cluster: Cluster, tmp_path: Path):
    # Lookaheads over other plans of the same model: deployed decoys no request invokes, and functions that
    # do not exist. What they wake is wrong every time.
    export(cluster.model, tmp_path / "ghosts", experts_per_function=12, prefix="ghost")
    ghosts = Plan.load(tmp_path / "ghosts")
    decoy_first, decoy_second = (f.name for f in cluster.decoys.functions)
    ghost_second = layer_functions(ghosts, ghosts.model.moe_layers[1])
    metrics = Metrics()
    with RecordingProxy(cluster.gateway.url) as proxy, remote_split(cluster, proxy) as (split, connection, log):
        prewarmer = Prewarmer(connection, lambda tenant, tokens: {}, threshold=1.0, max_concurrent=4, observer=metrics)
        log.observers.append(prewarmer.observe_invocation)
        for plan in (cluster.decoys, ghosts):
            with looking_ahead(split.trunk, Lookahead(split.trunk.moe_blocks, plan, prewarmer.wake)):
                assert generate(split.trunk, [PROMPT], SamplingParams(max_new_tokens=NEW_TOKENS)) == [cluster.expected]

        expected = [(decoy_second, WakeOutcome.SCALED), *((name, WakeOutcome.NOT_FOUND) for name in ghost_second)]
        outcomes = partial(wake_counts, metrics, expected)
        assert wait_until(lambda: all(outcomes().values()), OUTCOMES_WITHIN_S), outcomes()
        assert paths(proxy.events, SCALE_PATH).count(SCALE_PATH + decoy_second) == 1  # never a second scale
        assert not [p for p in paths(proxy.events, "/system/") if p.endswith("/" + decoy_first)]
        assert replicas(cluster.gateway)[decoy_second] == 1  # woken for nothing: only memory-time lost
    scale(cluster.gateway, decoy_second, 0)
