"""Faults under load: replicas, the function runtime and the gateway killed while tenants decode.

Real processes throughout: an embedded gateway with generated credentials, a control plane that
deploys its plan there and keeps it deployed, and closed-loop clients of three tenants whose every
answer is checked against the tokens the same split computes in-process (themselves checked against
transformers). A fault may fail requests, answered as errors; it must never give a wrong answer,
leave a request unanswered, or need a person to redeploy.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from faasmoe.bench.chaos import (
    Fault,
    FaultInjector,
    Outcome,
    Tally,
    Tenant,
    Traffic,
    platform_under_test,
    reference_probes,
)
from faasmoe.planning.export import export
from tests.conftest import TEST_THREADS
from tests.reference import load_reference, reference_greedy

MODEL = "tiny-fp32"
TENANTS = [Tenant("alpha", "sk-alpha-faults-1"), Tenant("beta", "sk-beta-faults-2"), Tenant("gamma", "sk-gamma-3")]
PROMPTS = [[11, 42, 7, 300, 5, 19, 77, 2, 64], [5, 9, 120, 33], [400, 401, 3, 3, 17, 250], [8, 1, 99]]
NEW_TOKENS = 8
CLIENTS = 4
# Seconds from the start of the load: each kind of fault, the gateway restart in the middle, and a
# replica killed again after the gateway came back (the redeployed functions are real ones too).
SCHEDULE = [
    (2.0, Fault.KILL_REPLICA),
    (4.0, Fault.KILL_ZYGOTE),
    (7.0, Fault.KILL_REPLICA),
    (9.0, Fault.RESTART_GATEWAY),
    (13.0, Fault.KILL_REPLICA),
]
# Load goes on this long after the last fault, so that the platform is seen serving again under it.
SETTLE_S = 6.0


@pytest.fixture(scope="module")
def probes_and_plan(tiny_fp32: Path, tmp_path_factory: pytest.TempPathFactory):
    plan = tmp_path_factory.mktemp("faults") / "plan"
    export(tiny_fp32, plan, experts_per_function=5)
    probes = reference_probes(tiny_fp32, plan, PROMPTS, NEW_TOKENS)
    return probes, plan


def test_the_reference_tokens_are_transformers_own(tiny_fp32: Path, probes_and_plan):
    probes, _ = probes_and_plan
    assert [p.tokens for p in probes] == reference_greedy(load_reference(tiny_fp32), PROMPTS, NEW_TOKENS)


def test_killed_replicas_zygote_and_gateway_give_no_wrong_or_unanswered_result(
    tiny_fp32: Path, probes_and_plan, tmp_path: Path
):
    probes, plan = probes_and_plan
    with platform_under_test(tiny_fp32, plan, tmp_path, TENANTS, threads=TEST_THREADS,
                             reconcile_interval_s=0.5) as (gateway, server):  # fmt: skip
        traffic = Traffic(server.url, MODEL, TENANTS, probes, request_timeout_s=90.0)
        before, during, after = Tally(), Tally(), Tally()

        async def scenario() -> None:
            await traffic.round(before)
            injector = FaultInjector(gateway, during)
            faults_done = asyncio.Event()

            async def faults() -> None:
                await injector.run(SCHEDULE)
                await asyncio.sleep(SETTLE_S)
                faults_done.set()

            await asyncio.gather(faults(), traffic.run(CLIENTS, faults_done.is_set, during))
            await traffic.round(after)

        asyncio.run(scenario())

    report = during.summary()
    assert before.outcomes[Outcome.OK] == before.requests == len(TENANTS) * len(PROMPTS), before.summary()
    assert during.faults == {Fault.KILL_REPLICA: 3, Fault.KILL_ZYGOTE: 1, Fault.RESTART_GATEWAY: 1}, report
    assert during.outcomes[Outcome.WRONG] == 0, report
    assert during.outcomes[Outcome.LOST] == 0, report
    assert during.outcomes[Outcome.HUNG] == 0, report
    assert all(status in (200, 502, 503) for status in during.statuses), report
    # Served again after the last fault, under load, and then every probe of every tenant, exactly,
    # with nobody having run `faasmoe deploy` after the gateway restart.
    assert during.ok_after_last_fault > 0, report
    assert after.outcomes[Outcome.OK] == after.requests == len(TENANTS) * len(PROMPTS), after.summary()
