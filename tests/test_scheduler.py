"""Continuous batching across tenants: fair admission, the prefill budget, cancelled requests dropped."""

from __future__ import annotations

from transformers import DynamicCache

from faasmoe.model.sampling import SamplingParams
from faasmoe.model.trunk import SequenceState
from faasmoe.server.scheduler import Scheduler, SchedulerSettings
from faasmoe.server.sequence import Sequence


def sequence(tenant: str, prompt_tokens: int = 4) -> Sequence:
    prompt = list(range(prompt_tokens))
    seq = Sequence(tenant, prompt, SamplingParams(max_new_tokens=4))
    seq.state = SequenceState(DynamicCache(), list(prompt))  # what Engine.submit gives it
    return seq


def test_a_tenant_with_many_requests_cannot_starve_one_with_few():
    scheduler = Scheduler(SchedulerSettings(max_running=3))
    for _ in range(10):
        scheduler.add(sequence("busy"))
    scheduler.add(sequence("quiet"))
    batch, _ = scheduler.schedule()
    assert sorted(s.tenant for s in batch) == ["busy", "busy", "quiet"]


def test_admission_alternates_between_tenants():
    scheduler = Scheduler(SchedulerSettings(max_running=4))
    for tenant in ("a", "a", "a", "b", "b", "b"):
        scheduler.add(sequence(tenant))
    batch, _ = scheduler.schedule()
    assert [s.tenant for s in batch] == ["a", "b", "a", "b"]
    scheduler.finish(batch[0])
    scheduler.finish(batch[1])
    batch, _ = scheduler.schedule()
    assert sorted(s.tenant for s in batch[2:]) == ["a", "b"]


def test_prefill_budget_limits_prompt_tokens_per_step_but_an_oversize_prompt_still_runs():
    scheduler = Scheduler(SchedulerSettings(max_running=8, max_prefill_tokens=10))
    for tenant in ("a", "b", "c"):
        scheduler.add(sequence(tenant, prompt_tokens=4))
    batch, _ = scheduler.schedule()
    assert len(batch) == 2  # 4 + 4 fit the budget of 10, a third 4 does not
    lone = Scheduler(SchedulerSettings(max_running=8, max_prefill_tokens=10))
    lone.add(sequence("a", prompt_tokens=50))
    assert len(lone.schedule()[0]) == 1


def test_cancelled_sequences_are_dropped_waiting_or_running():
    scheduler = Scheduler(SchedulerSettings(max_running=1))
    running, waiting = sequence("a"), sequence("b")
    scheduler.add(running)
    scheduler.add(waiting)
    assert scheduler.schedule()[0] == [running]
    running.cancelled = waiting.cancelled = True
    batch, dropped = scheduler.schedule()
    assert batch == [] and set(dropped) == {running, waiting}
    assert not scheduler.has_work()
