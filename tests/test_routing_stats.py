"""Routing statistics: counted per tenant from real steps of the split model, decayed, persisted as the
routing profile by `faasmoe serve`, on /metrics, and the popularity predictor built from them."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from faasmoe.dispatch.executor import open_executor
from faasmoe.elastic.predictor import PopularityPredictor, PredictorSettings, StepRecord, evaluate
from faasmoe.elastic.routing_profile import ProfileWriter, RoutingProfileError, load_profile, save_profile
from faasmoe.elastic.routing_stats import RoutingRecorder, RoutingStats
from faasmoe.model.split_model import SplitModel
from faasmoe.planning.export import export
from faasmoe.planning.plan import ModelShape, Plan
from faasmoe.process import wait_until
from faasmoe.server.process import ServeProcess
from tests.conftest import TEST_THREADS
from tests.test_serve import metric

HALF_LIFE_S = 600.0
# One step of three sequences, two of them alpha's and not adjacent, then a decode step of one token each.
STEP = [("alpha", [11, 42, 7, 300, 5]), ("beta", [5, 9, 120]), ("alpha", [400, 401, 3, 17])]


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def plan_dir(tiny_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    plan = tmp_path_factory.mktemp("routing") / "plan"
    export(tiny_fp32, plan, experts_per_function=5)
    return plan


@pytest.fixture(scope="module")
def split(tiny_fp32: Path, plan_dir: Path):
    model = SplitModel.load(tiny_fp32, plan_dir, open_executor)
    yield model
    model.close()


def stats_for(plan: Plan, clock: Clock | None = None) -> RoutingStats:
    return RoutingStats(plan.model.moe_layers, plan.model.num_experts, HALF_LIFE_S, clock or Clock())


def run_steps(split: SplitModel, recorder: RoutingRecorder | None = None):
    """STEP's prefill step and one decode step, as the engine runs them: their logits, and each MoE layer's
    router choices (seen only with a recorder)."""
    trunk = split.trunk
    seen: list[tuple[int, torch.Tensor]] = []

    def observe(layer: int, expert_ids: torch.Tensor) -> None:
        seen.append((layer, expert_ids.clone()))
        recorder.observe(layer, expert_ids)

    trunk.observe_routing(None if recorder is None else observe)
    try:
        states = [trunk.new_sequence(prompt) for _, prompt in STEP]
        logits = []
        for _ in range(2):
            if recorder is not None:
                tenants = [tenant for tenant, _ in STEP]
                recorder.start_step([(t, len(state.new_tokens)) for t, state in zip(tenants, states, strict=True)])
            rows = torch.stack(trunk.step(states))
            if recorder is not None:
                recorder.end_step()
            logits.append(rows)
            for state, row in zip(states, rows, strict=True):
                state.new_tokens = [int(row.argmax())]
        return logits, seen
    finally:
        trunk.observe_routing(None)


def test_a_step_counts_each_tenants_slots_and_changes_no_logit(split: SplitModel):
    plain, _ = run_steps(split)
    stats = stats_for(split.plan)
    observed, seen = run_steps(split, stats.recorder())
    for before, after in zip(plain, observed, strict=True):
        assert torch.equal(before, after)

    # The same counts, token by token: the trunk's token order is the batch order.
    prefill = [tenant for tenant, prompt in STEP for _ in prompt]
    decode = [tenant for tenant, _ in STEP]
    moe_layers = split.plan.model.moe_layers
    expected = defaultdict(lambda: torch.zeros(len(moe_layers), split.plan.model.num_experts, dtype=torch.int64))
    assert [layer for layer, _ in seen] == moe_layers * 2
    for index, (layer, expert_ids) in enumerate(seen):
        owners = prefill if index < len(moe_layers) else decode
        for tenant, experts in zip(owners, expert_ids.tolist(), strict=True):
            for expert in experts:
                expected[tenant][moe_layers.index(layer), expert] += 1
    totals = stats.totals()
    assert totals.keys() == {"alpha", "beta"}
    for tenant, table in totals.items():
        assert torch.equal(table, expected[tenant])
    k = split.plan.model.num_experts_per_tok
    assert totals["alpha"].sum(-1).tolist() == [(9 + 2) * k] * len(moe_layers)
    _, decayed = stats.decayed()  # the clock stood still: nothing decayed yet
    assert all(torch.equal(decayed[t], totals[t].double()) for t in totals)


def test_a_step_that_cannot_be_counted_is_logged_and_dropped(caplog: pytest.LogCaptureFixture):
    stats = RoutingStats([0, 1], 4, HALF_LIFE_S, Clock())
    recorder = stats.recorder()
    recorder.start_step([("alpha", 3)])
    for layer in (0, 1):
        recorder.observe(layer, torch.zeros(2, 2, dtype=torch.int64))  # two tokens routed, not three
    with caplog.at_level(logging.ERROR, logger="faasmoe.elastic.routing_stats"):
        recorder.end_step()  # does not raise: the engine's step is done and must not fail for its statistics
    assert "the trunk routed 2 tokens; the step started with 3" in caplog.text
    assert stats.totals() == {}
    recorder.start_step([("alpha", 2)])  # the next step counts as usual
    for layer in (0, 1):
        recorder.observe(layer, torch.tensor([[0, 1], [0, 3]]))
    recorder.end_step()
    assert stats.totals()["alpha"].tolist() == [[2, 1, 0, 1]] * 2


def test_counts_halve_in_one_half_life():
    clock = Clock()
    stats = RoutingStats([0, 1], 4, HALF_LIFE_S, clock)
    slots = torch.arange(8, dtype=torch.int64).view(1, 2, 4)  # one tenant's step: [tenants, layers, experts]
    stats.add(["alpha"], slots)
    clock.now += HALF_LIFE_S
    assert torch.equal(stats.decayed()[1]["alpha"], slots[0] / 2)
    stats.add(["alpha"], slots)  # a later step adds to the decayed counts
    clock.now += 2 * HALF_LIFE_S
    assert torch.equal(stats.decayed()[1]["alpha"], slots[0] * 1.5 / 4)
    assert torch.equal(stats.totals()["alpha"], 2 * slots[0])  # the counter does not decay
    clock.now -= 10 * HALF_LIFE_S  # a clock stepped back decays nothing, and grows nothing
    assert torch.equal(stats.decayed()[1]["alpha"], slots[0] * 1.5)


def seeded_stats(plan: Plan, clock: Clock, tenants: tuple[str, ...] = ("alpha", "beta")) -> RoutingStats:
    stats = stats_for(plan, clock)
    generator = torch.Generator().manual_seed(0)
    shape = (len(plan.model.moe_layers), plan.model.num_experts)
    stats.restore(clock.now - 30.0, {t: torch.rand(shape, generator=generator, dtype=torch.float64) * 1e3
                                     for t in tenants})  # fmt: skip
    return stats


def test_the_profile_round_trips(split: SplitModel, tmp_path: Path):
    clock = Clock()
    stats = seeded_stats(split.plan, clock)
    path = tmp_path / "profile.json"
    save_profile(path, stats, "tiny-fp32")
    document = json.loads(path.read_text())
    assert document["version"] == 1
    assert (document["model"], document["moe_layers"]) == ("tiny-fp32", split.plan.model.moe_layers)
    assert document["decayed_to"] == clock.now
    assert path.stat().st_mode & 0o077 == 0  # the tenants' traffic is the operator's to read

    loaded = stats_for(split.plan, clock)
    assert load_profile(path, loaded, "tiny-fp32")
    assert stats.decayed()[1].keys() == loaded.decayed()[1].keys() == {"alpha", "beta"}
    for tenant, table in stats.decayed()[1].items():
        assert torch.equal(loaded.decayed()[1][tenant], table)
    clock.now += HALF_LIFE_S  # and they decay on from where they were saved
    for tenant, table in stats.decayed()[1].items():
        torch.testing.assert_close(loaded.decayed()[1][tenant], table, rtol=1e-12, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]  # no temporary file left


def test_another_models_profile_is_refused_and_kept(split: SplitModel, tmp_path: Path):
    clock = Clock()
    path = tmp_path / "profile.json"
    save_profile(path, seeded_stats(split.plan, clock), "tiny-fp32")
    written = path.read_text()
    with pytest.raises(RoutingProfileError, match="made for model 'tiny-fp32'.*serves model 'other'"):
        load_profile(path, stats_for(split.plan, clock), "other")
    wider = RoutingStats(split.plan.model.moe_layers, split.plan.model.num_experts + 1, HALF_LIFE_S, clock)
    with pytest.raises(RoutingProfileError, match="experts each"):
        load_profile(path, wider, "tiny-fp32")
    newer = json.loads(written) | {"version": 2}
    path.write_text(json.dumps(newer))
    with pytest.raises(RoutingProfileError, match="version 2"):
        load_profile(path, stats_for(split.plan, clock), "tiny-fp32")


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe not text", b'{"version": 1, "model": "tiny-fp32"', b"[1, 2]", b"version"],
    ids=["binary", "truncated", "not-an-object", "not-json"],
)
def test_a_corrupt_profile_warns_and_starts_fresh(
    split: SplitModel, tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
):
    path = tmp_path / "profile.json"
    path.write_bytes(content)
    stats = stats_for(split.plan)
    with caplog.at_level(logging.WARNING, logger="faasmoe.elastic.routing_profile"):
        assert not load_profile(path, stats, "tiny-fp32")
    assert "starting with fresh routing statistics" in caplog.text
    assert stats.decayed()[1] == {}


def test_a_profile_with_a_misshapen_table_is_corrupt(split: SplitModel, tmp_path: Path, caplog):
    clock = Clock()
    path = tmp_path / "profile.json"
    save_profile(path, seeded_stats(split.plan, clock), "tiny-fp32")
    document = json.loads(path.read_text())
    document["tenants"]["alpha"][0].pop()
    path.write_text(json.dumps(document))
    stats = stats_for(split.plan, clock)
    with caplog.at_level(logging.WARNING, logger="faasmoe.elastic.routing_profile"):
        assert not load_profile(path, stats, "tiny-fp32")
    assert "tenant 'alpha': expected" in caplog.text
    assert stats.decayed()[1] == {}


def test_the_writer_writes_periodically(tmp_path: Path):
    stats = RoutingStats([0, 1], 4, HALF_LIFE_S, Clock())
    path = tmp_path / "profile.json"
    writer = ProfileWriter(path, stats, "tiny-fp32", interval_s=0.05)
    writer.start()
    try:
        assert wait_until(path.exists, 10.0)
        stats.add(["alpha"], torch.ones(1, 2, 4, dtype=torch.int64))
        assert wait_until(lambda: "alpha" in json.loads(path.read_text())["tenants"], 10.0)
    finally:
        writer.stop()
    assert json.loads(path.read_text())["tenants"] == {"alpha": [[1.0] * 4] * 2}


# Two MoE layers of 12 experts, top-2, 4 experts per function: functions e000-003, e004-007, e008-011.
SHAPE = ModelShape(model_type="qwen2_moe", num_hidden_layers=2, hidden_size=8, moe_intermediate_size=8,
                   num_experts=12, num_experts_per_tok=2, dtype="float32", moe_layers=[0, 1])  # fmt: skip
PLAN = Plan.group(SHAPE, experts_per_function=4)
X, Y = "moe-l00-e000-003", "moe-l00-e008-011"


def predictor_with(tables: dict[str, torch.Tensor]) -> PopularityPredictor:
    clock = Clock()
    stats = stats_for(PLAN, clock)
    stats.restore(clock.now, tables)
    return PopularityPredictor(PLAN, stats, PredictorSettings())


def test_a_flat_prior_predicts_by_token_count():
    predictor = predictor_with({})
    one = predictor.wake_probabilities("alpha", 1)
    assert one.keys() == {f.name for f in PLAN.functions}
    # Each slot lands in a function's 4 of 12 experts with probability 1/3; a token has 2 slots.
    assert all(p == pytest.approx(1 - (2 / 3) ** 2) for p in one.values())
    assert all(p > 1 - 1e-9 for p in predictor.wake_probabilities("alpha", 48).values())
    assert all(p == 0 for p in predictor.wake_probabilities("alpha", 0).values())


def test_a_tenant_that_routes_to_one_function_is_predicted_to_invoke_it():
    sharp = torch.zeros(2, 12, dtype=torch.float64)
    sharp[:, 0:4] = 5_000.0  # alpha: every slot of both layers to experts 0-3
    flat = torch.full((2, 12), 2.0, dtype=torch.float64)  # beta: a few slots everywhere
    predictor = predictor_with({"alpha": sharp, "beta": flat})
    alpha = predictor.wake_probabilities("alpha", 1)
    assert alpha[X] > 0.99
    assert alpha[Y] < 0.01
    # beta's own 24 slots per layer move it a little from all tenants' (mostly alpha's) towards flat.
    beta = predictor.wake_probabilities("beta", 1)
    assert beta[X] > 0.9
    assert alpha[Y] < beta[Y] < 0.5
    assert beta == pytest.approx(by_hand(predictor, "beta", 1))
    # A tenant never seen is predicted as all tenants together.
    assert predictor.wake_probabilities("new", 1) == pytest.approx(by_hand(predictor, "new", 1))
    assert all(p > 0.99 for p in predictor.wake_probabilities("beta", 48).values())


def by_hand(predictor: PopularityPredictor, tenant: str, tokens: int) -> dict[str, float]:
    """The module docstring's formula, expert by expert, with the default prior strengths (1 and 64)."""
    tables = predictor.stats.decayed()[1]
    every = sum(tables.values())
    overall = (every + 1.0) / (every.sum(-1, keepdim=True) + 12.0)
    own = tables.get(tenant, torch.zeros(2, 12, dtype=torch.float64))
    p = (own + 64.0 * overall) / (own.sum(-1, keepdim=True) + 64.0)
    result = {}
    for function in PLAN.functions:
        held = defaultdict(float)
        for layer, expert in function.experts:
            held[layer] += float(p[layer, expert])
        result[function.name] = 1 - math.prod((1 - share) ** (2 * tokens) for share in held.values())
    return result


def test_evaluate_counts_hits_and_wasted_wakes():
    predictions = {"alpha": {X: 0.9, Y: 0.2, "z": 0.6}, "beta": {X: 0.1, Y: 0.7, "z": 0.0}}
    steps = [StepRecord("alpha", 4, frozenset({X, Y})), StepRecord("beta", 1, frozenset({Y}))]
    result = evaluate(lambda tenant, tokens: predictions[tenant], steps, threshold=0.5)
    assert (result.hit_rate, result.wasted_wakes, result.wakes, result.invocations) == (2 / 3, 1, 3, 3)


def test_serve_counts_on_metrics_and_writes_the_profile_on_shutdown(tiny_fp32: Path, plan_dir: Path, tmp_path: Path):
    plan = Plan.load(plan_dir)
    clock = Clock(time.time())
    profile = tmp_path / "profile.json"
    save_profile(profile, seeded_stats(plan, clock, ("beta",)), "tiny-fp32")  # beta's counts from an earlier run
    seeded = json.loads(profile.read_text())
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(yaml.safe_dump({"tenants": [{"name": "alpha", "api_keys": ["sk-alpha-0001"]}]}))
    key = "operator-metrics-0006"
    args = ["--model", str(tiny_fp32), "--plan", str(plan_dir), "--tenants", str(tenants), "--threads",
            str(TEST_THREADS), "--metrics-key", key, "--routing-profile", str(profile),
            "--routing-profile-interval", "3600"]  # fmt: skip
    prompt, max_tokens = [11, 42, 7, 300, 5, 19, 77, 2, 64], 4
    k = plan.model.num_experts_per_tok
    slots = (len(prompt) + max_tokens - 1) * k  # the last token is sampled, never fed back
    with ServeProcess(args=args, log_path=tmp_path / "serve.log") as server:
        body = {"model": "tiny-fp32", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=60, trust_env=False,
                              headers={"Authorization": "Bearer sk-alpha-0001"})  # fmt: skip
        assert response.status_code == 200, response.text
        page = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {key}"}, trust_env=False).text
        for layer in plan.model.moe_layers:
            per_expert = [metric(page, "faasmoe_routed_slots_total", tenant="alpha", layer=str(layer),
                                 expert=str(e)) for e in range(plan.model.num_experts)]  # fmt: skip
            assert sum(per_expert) == slots
        assert 'tenant="beta"' not in page  # the counter counts this process's slots only
        assert json.loads(profile.read_text()) == seeded  # nothing written before the interval
    written = json.loads(profile.read_text())
    assert written["decayed_to"] > seeded["decayed_to"]
    decay = 2 ** (-(written["decayed_to"] - seeded["decayed_to"]) / 600.0)  # the default half-life
    beta = torch.tensor(seeded["tenants"]["beta"], dtype=torch.float64) * decay
    torch.testing.assert_close(torch.tensor(written["tenants"]["beta"], dtype=torch.float64), beta, rtol=1e-9, atol=0)
    for row in written["tenants"]["alpha"]:
        assert 0.9 * slots <= sum(row) <= slots
