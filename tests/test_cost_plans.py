"""Popularity-aware plans, the deployment cost model, `faasmoe export --experts-per-function auto` and `plan-cost`."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from faasmoe.cli import app
from faasmoe.elastic.predictor import PopularityPredictor
from faasmoe.elastic.routing_profile import RoutingProfile
from faasmoe.elastic.routing_stats import RoutingStats
from faasmoe.planning.cost import (
    CostSettings,
    PlanEstimate,
    candidate_sizes,
    cheapest,
    estimate,
    estimate_candidates,
)
from faasmoe.planning.cost_table import CHOSEN, GIVEN, figure
from faasmoe.planning.export import export
from faasmoe.planning.grouping import Grouping
from faasmoe.planning.plan import PLAN_FILE, FunctionSpec, ModelShape, Plan
from faasmoe.planning.profile import frozen_stats, popularity, read_profile, tenant_token_rates
from faasmoe.planning.stack import LABEL_EXPERTS, StackSettings, function_labels, sized_plan
from tests.test_split_exactness import check_fp32_plan

# The tiny preset: 2 MoE layers (0, 1) of 12 experts, top-4. Alpha routes to four experts per layer only;
# beta a little to two others, so popularity is summed over tenants.
HOT = {0: [2, 5, 7, 11], 1: [1, 4, 8, 10]}
WARMISH = {0: [0, 3], 1: [6, 9]}
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Weights only: the tiny model's experts are KBs, so a replica's 384 MiB base would hide the grouping.
WEIGHTS_ONLY = CostSettings(base_memory_mib=0)


def tiny_shape() -> ModelShape:
    from faasmoe.model.presets import preset_config

    return ModelShape.from_config(preset_config("tiny"))


def skewed_profile(shape: ModelShape, path: Path) -> RoutingProfile:
    tables = {tenant: [[0.0] * shape.num_experts for _ in shape.moe_layers] for tenant in ("alpha", "beta")}
    for row, layer in enumerate(shape.moe_layers):
        for expert in HOT[layer]:
            tables["alpha"][row][expert] = 900.0
        for expert in WARMISH[layer]:
            tables["beta"][row][expert] = 30.0
    profile = RoutingProfile(model="tiny", moe_layers=shape.moe_layers, num_experts=shape.num_experts,
                             half_life_s=600.0, decayed_to=1.7e9, tenants=tables)  # fmt: skip
    path.write_text(profile.model_dump_json())
    return profile


def faasmoe(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "faasmoe.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_contiguous_plans_keep_their_names_and_experts():
    plan = Plan.group(tiny_shape(), 5, 2)
    assert plan.grouping is Grouping.CONTIGUOUS
    assert [f.name for f in plan.functions] == ["moe-l00-01-e000-004", "moe-l00-01-e005-009", "moe-l00-01-e010-011"]
    assert plan.functions[2].experts == [(0, 10), (0, 11), (1, 10), (1, 11)]


def test_popularity_puts_the_hot_experts_together(tmp_path):
    shape = tiny_shape()
    hot = popularity(skewed_profile(shape, tmp_path / "profile.json"))
    plan = Plan.group(shape, 4, grouping=Grouping.POPULARITY, popularity=hot)
    by_name = {f.name: f for f in plan.functions}
    assert list(by_name) == [f"moe-l{layer:02d}-g{g:02d}" for layer in (0, 1) for g in range(3)]
    for layer in (0, 1):
        assert by_name[f"moe-l{layer:02d}-g00"].experts == [(layer, e) for e in HOT[layer]]
        # the next hottest (beta's), then the unused ones in index order
        cold = sorted(set(range(12)) - set(HOT[layer]) - set(WARMISH[layer]))
        assert by_name[f"moe-l{layer:02d}-g01"].experts == [(layer, e) for e in sorted(WARMISH[layer] + cold[:2])]
    for function in plan.functions:
        assert DNS_1123.fullmatch(function.name) and len(function.name) <= 63
    held = [pair for function in plan.functions for pair in function.experts]
    assert sorted(held) == [(layer, e) for layer in (0, 1) for e in range(12)]  # every expert, once

    # two layers per function: ranks per layer, so the first function holds both layers' hot experts
    two = Plan.group(shape, 4, 2, grouping=Grouping.POPULARITY, popularity=hot)
    assert two.functions[0].name == "moe-l00-01-g00"
    assert two.functions[0].experts == [(layer, e) for layer in (0, 1) for e in HOT[layer]]

    # a profile without traffic groups as contiguous does (ties keep index order)
    flat = Plan.group(shape, 5, grouping=Grouping.POPULARITY, popularity=torch.zeros(2, 12))
    assert [f.experts for f in flat.functions] == [f.experts for f in Plan.group(shape, 5).functions]


# Ranks 0-3 of each layer are HOT; rank 4 is beta's first (ties keep index order).
FIRST_FUNCTION = {
    (4, 1): [(0, e) for e in HOT[0]],
    (5, 2): [(0, e) for e in sorted([*HOT[0], WARMISH[0][0]])] + [(1, e) for e in sorted([*HOT[1], WARMISH[1][0]])],
}


@pytest.mark.parametrize(("experts_per_function", "layers_per_function"), list(FIRST_FUNCTION))
def test_popularity_plans_are_exact(tiny_fp32, tmp_path, experts_per_function, layers_per_function):
    profile = skewed_profile(tiny_shape(), tmp_path / "profile.json")
    export(tiny_fp32, tmp_path / "plan", experts_per_function, layers_per_function,
           grouping=Grouping.POPULARITY, popularity=popularity(profile))  # fmt: skip
    plan = Plan.load(tmp_path / "plan")
    assert plan.grouping is Grouping.POPULARITY
    assert plan.functions[0].experts == FIRST_FUNCTION[(experts_per_function, layers_per_function)]
    check_fp32_plan(tiny_fp32, tmp_path / "plan")


def table_rows(text: str) -> dict[str, list[str]]:
    """A printed estimate table: per plan name ("popularity e4 l1", "... (given)"), the cells after it."""
    rows = {}
    for line in text.splitlines()[1:]:
        cells = line.split()
        width = 4 if len(cells) > 3 and cells[3] == GIVEN else 3
        rows[" ".join(cells[:width])] = cells[width:]
    return rows


def printed(e: PlanEstimate, cheapest_one: PlanEstimate) -> list[str]:
    figures = (e.warm_functions, e.gb_s_per_hour, e.cold_starts_per_hour, e.invocations_per_token, e.cost_per_hour)
    marker = CHOSEN.split() if e is cheapest_one else []
    return [str(e.functions), "yes" if e.fits_ce else "no", *map(figure, figures), *marker]


def test_auto_exports_the_cheapest_candidate_and_prints_the_models_figures(tiny_fp32, tmp_path):
    profile = skewed_profile(tiny_shape(), tmp_path / "profile.json")
    done = faasmoe("export", tiny_fp32, tmp_path / "plan", "--experts-per-function", "auto",
                   "--routing-profile", tmp_path / "profile.json", "--base-memory-mib", "0")  # fmt: skip
    assert done.returncode == 0, done.stderr

    estimates = estimate_candidates(tiny_shape(), 1, profile, WEIGHTS_ONLY)
    best = cheapest(estimates)
    assert best.cost_per_hour == min(e.cost_per_hour for e in estimates)
    # hot experts together: never dearer than the contiguous plan of the same size, and the cheapest overall
    by_size = {(e.grouping, e.experts_per_function): e.cost_per_hour for e in estimates}
    assert all(by_size[(Grouping.POPULARITY, n)] <= by_size[(Grouping.CONTIGUOUS, n)] for n in candidate_sizes(12))
    assert best.grouping is Grouping.POPULARITY and best.experts_per_function < 12
    plan = Plan.load(tmp_path / "plan")
    assert (plan.grouping, plan.experts_per_function, plan.layers_per_function) == (
        best.grouping,
        best.experts_per_function,
        1,
    )

    table, _, summary = done.stdout.partition("\nwrote ")
    rows = table_rows(table)
    assert len(rows) == len(estimates) == 2 * len(candidate_sizes(12))
    for e in estimates:
        assert rows[e.name] == printed(e, best)
    assert f"{len(plan.functions)} functions (popularity, {best.experts_per_function} experts x 1 layer(s)" in summary
    check_fp32_plan(tiny_fp32, tmp_path / "plan")


def test_plan_cost_prints_the_given_plan_and_every_candidate(tiny_fp32, tmp_path):
    profile = skewed_profile(tiny_shape(), tmp_path / "profile.json")
    plan = export(tiny_fp32, tmp_path / "plan", 4, grouping=Grouping.POPULARITY, popularity=popularity(profile))
    runner = CliRunner()
    args = ["plan-cost", str(tmp_path / "plan"), "--routing-profile", str(tmp_path / "profile.json")]
    as_json = runner.invoke(app, [*args, "--json"])
    assert as_json.exit_code == 0, as_json.output
    settings = CostSettings()
    given = estimate(plan, profile, settings, given=True)
    others = estimate_candidates(plan.model, 1, profile, settings)
    assert json.loads(as_json.stdout) == [e.model_dump(mode="json") for e in [given, *others]]
    # the exported plan's recorded bytes are what candidates are sized with: the same figures
    twin = next(e for e in others if (e.grouping, e.experts_per_function) == (Grouping.POPULARITY, 4))
    assert twin.model_dump(exclude={"given"}) == given.model_dump(exclude={"given"})

    text = runner.invoke(app, [*args, "--tokens-per-second", "50", "--zero-duration", "30s"])
    assert text.exit_code == 0, text.output
    settings = CostSettings(tokens_per_second=50, zero_duration="30s")
    estimates = [estimate(plan, profile, settings, given=True), *estimate_candidates(plan.model, 1, profile, settings)]
    best = cheapest(estimates)
    rows = table_rows(text.stdout)
    assert rows[f"{given.name} {GIVEN}"] == printed(estimates[0], best)
    for e in estimates[1:]:
        assert rows[e.name] == printed(e, best)
    assert {e.name for e in estimates if not e.fits_ce} == {"contiguous e1 l1", "popularity e1 l1"}  # 24 > 15


def test_the_cost_model_formulas(tmp_path):
    shape = tiny_shape()
    profile = skewed_profile(shape, tmp_path / "profile.json")
    plan = sized_plan(shape, 4, 1, Grouping.POPULARITY, popularity(profile))
    settings = CostSettings(tokens_per_second=10.0, tokens_per_step=2, zero_duration="1m", base_memory_mib=1)
    got = estimate(plan, profile, settings)

    rates = tenant_token_rates(profile, shape.num_experts_per_tok)
    share = {tenant: rate / sum(rates.values()) for tenant, rate in rates.items()}
    predictor = PopularityPredictor(plan, frozen_stats(profile))
    arrivals = [sum(10.0 * share[t] / 2 * predictor.wake_probabilities(t, 2)[f.name] for t in rates)
                for f in plan.functions]  # fmt: skip
    memory_gb = [(f.bytes + (1 << 20)) / 1e9 for f in plan.functions]
    warm = [1 - math.exp(-lam * 60) for lam in arrivals]
    assert got.warm_functions == pytest.approx(sum(warm), rel=1e-12)
    assert got.gb_s_per_hour == pytest.approx(sum(w * m for w, m in zip(warm, memory_gb, strict=True)) * 3600)
    cold = sum(lam * math.exp(-lam * 60) for lam in arrivals) * 3600
    assert got.cold_starts_per_hour == pytest.approx(cold)
    # one layer per function: a function's invocations are its steps
    assert got.invocations_per_hour == pytest.approx(sum(arrivals) * 3600)
    assert got.invocations_per_token == pytest.approx(sum(arrivals) / 10.0)
    cold_start_price = 1.0 * sum(f.bytes for f in plan.functions) / 1e9 * settings.price_per_gb_s
    assert got.cost_per_hour == pytest.approx(
        got.gb_s_per_hour * 0.0000166667 + cold * cold_start_price + got.invocations_per_hour * 0.0000002
    )
    # a longer keep-alive: more memory-time, fewer cold starts
    longer = estimate(plan, profile, settings.model_copy(update={"zero_duration": "10m"}))
    assert longer.gb_s_per_hour > got.gb_s_per_hour and longer.cold_starts_per_hour < got.cold_starts_per_hour

    # two layers per function: invoked once per step that reaches it, called once per layer it serves
    two = estimate(sized_plan(shape, 12, 2), profile, settings)
    assert two.functions == 1 and two.warm_functions == pytest.approx(1 - math.exp(-60 * 10.0 / 2))
    assert two.invocations_per_token == pytest.approx(2 / 2)  # each 2-token step calls it in both layers


def test_resident_memory_counts_the_base_while_warm_and_each_expert_while_it_was_invoked_lately(tmp_path):
    shape = tiny_shape()
    profile = skewed_profile(shape, tmp_path / "profile.json")
    plan = sized_plan(shape, 4, 1, Grouping.CONTIGUOUS)
    billed = CostSettings(tokens_per_second=10.0, zero_duration="1m", base_memory_mib=1)
    resident = billed.model_copy(update={"memory": "resident"})
    got = estimate(plan, profile, resident)

    rates = tenant_token_rates(profile, shape.num_experts_per_tok)
    share = {tenant: rate / sum(rates.values()) for tenant, rate in rates.items()}
    singles = Plan(model=shape, experts_per_function=1, layers_per_function=1, functions=[
        FunctionSpec(name=f"x{layer}-{e}", shard="", layers=[layer], experts=[(layer, e)])
        for f in plan.functions for layer, e in f.experts])  # fmt: skip
    predictor, per_expert = PopularityPredictor(singles, frozen_stats(profile)), plan.functions[0].bytes / 4 / 1e9
    touched = [1 - math.exp(-60 * sum(10.0 * share[t] * predictor.wake_probabilities(t, 1)[x.name] for t in rates))
               for x in singles.functions]  # fmt: skip
    base = got.warm_functions * (1 << 20) / 1e9
    assert got.gb_s_per_hour == pytest.approx((base + per_expert * sum(touched)) * 3600, rel=1e-9)
    # the same warm functions, cold starts and calls as billed; never more memory than a whole shard while warm
    assert got.model_dump(exclude={"gb_s_per_hour", "cost_per_hour"}) == estimate(plan, profile, billed).model_dump(
        exclude={"gb_s_per_hour", "cost_per_hour"}
    )
    assert got.gb_s_per_hour < estimate(plan, profile, billed).gb_s_per_hour
    assert min(touched) < 0.5 < max(touched)  # the profile's cold experts are rarely resident, its hot ones are


def test_a_steady_rate_is_read_back_from_the_profile():
    clock = [0.0]
    stats = RoutingStats([0, 1], 12, half_life_s=60.0, clock=lambda: clock[0])
    slots = torch.zeros(1, 2, 12, dtype=torch.int64)
    slots[0, :, :4] = 3  # 3 tokens/s of top-4 routing, every second
    for _ in range(60 * 20):  # 20 half-lives: the decayed counts have settled
        clock[0] += 1.0
        stats.add(["alpha"], slots)
    profile = RoutingProfile.of(stats, "tiny")
    assert tenant_token_rates(profile, 4)["alpha"] == pytest.approx(3.0, rel=0.01)


def test_old_plans_without_a_grouping_still_load(tiny_fp32, tmp_path):
    export(tiny_fp32, tmp_path / "plan", 5)
    document = json.loads((tmp_path / "plan" / PLAN_FILE).read_text())
    assert document.pop("grouping") == "contiguous"
    (tmp_path / "plan" / PLAN_FILE).write_text(json.dumps(document))
    plan = Plan.load(tmp_path / "plan")
    assert plan.grouping is Grouping.CONTIGUOUS
    assert [(f.name, f.experts) for f in plan.functions] == [
        (f.name, f.experts) for f in Plan.group(plan.model, 5).functions
    ]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["export", "{model}", "{tmp}/p", "--grouping", "popularity"], "need --routing-profile FILE"),
        (["export", "{model}", "{tmp}/p", "--experts-per-function", "auto"], "need --routing-profile FILE"),
        (["export", "{model}", "{tmp}/p", "--experts-per-function", "0"], "positive integer or auto"),
        (["export", "{model}", "{tmp}/p", "--grouping", "hot"], "must be contiguous or popularity"),
        (["export", "{model}", "{tmp}/p", "--price-per-gb-s", "1"], "for --experts-per-function auto only"),
        (["export", "{model}", "{tmp}/p", "--grouping", "popularity", "--routing-profile", "{tmp}/none.json"],
         "does not exist: record one with `faasmoe serve --routing-profile"),
        (["export", "{model}", "{tmp}/p", "--experts-per-function", "auto", "--routing-profile", "{tmp}/other.json"],
         "was recorded on a model with MoE layers [0, 1, 2] of 8 experts; this model has MoE layers [0, 1] of 12"),
        (["plan-cost", "{tmp}/plan", "--routing-profile", "{tmp}/other.json"], "recorded on a model with MoE layers"),
    ],
)  # fmt: skip
def test_a_missing_or_mismatched_profile_is_a_clear_error(tiny_fp32, tmp_path, args, says):
    other = RoutingProfile(model="other", moe_layers=[0, 1, 2], num_experts=8, half_life_s=600.0, decayed_to=0.0,
                           tenants={"alpha": [[1.0] * 8] * 3})  # fmt: skip
    (tmp_path / "other.json").write_text(other.model_dump_json())
    export(tiny_fp32, tmp_path / "plan", 12)
    done = CliRunner().invoke(app, [a.format(model=tiny_fp32, tmp=tmp_path) for a in args])
    assert done.exit_code == 2, done.output
    assert done.stderr.startswith("error: ") and says in done.stderr, done.stderr
    assert not (tmp_path / "p").exists()


def test_read_profile_refuses_a_corrupt_file(tmp_path):
    (tmp_path / "profile.json").write_text('{"version": 1, "model": "tiny"}')
    with pytest.raises(Exception, match="is malformed"):
        read_profile(tmp_path / "profile.json", tiny_shape())


def test_stack_labels_name_an_expert_block_only_when_every_layer_holds_it():
    shape = tiny_shape()
    ranks = torch.zeros(2, 12)
    ranks[0, [0, 1]] = ranks[1, [2, 3]] = 1.0  # hot: experts 0, 1 of layer 0 and 2, 3 of layer 1
    plan = Plan.group(shape, 2, 2, grouping=Grouping.POPULARITY, popularity=ranks)
    first = plan.functions[0]
    assert first.experts == [(0, 0), (0, 1), (1, 2), (1, 3)]  # experts 0-3 in all, but no block of both layers
    assert LABEL_EXPERTS not in function_labels(first, StackSettings())
    contiguous = Plan.group(shape, 2, 2).functions[0]
    assert function_labels(contiguous, StackSettings())[LABEL_EXPERTS] == "0-1"
