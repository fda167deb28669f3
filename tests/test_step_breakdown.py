"""Where a step's time goes: the MoE blocks' routed-expert time, invocations' compute and overhead, /metrics.

Through the embedded gateway and real function processes; the figures are timings, so only relations
that must hold are asserted (counts, parts of a whole, compute inside its round trip).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from faasmoe.bench.breakdown import Scrape, step_figures
from faasmoe.dispatch.executor import open_executor
from faasmoe.dispatch.remote import Invocation, InvocationLog
from faasmoe.gateway.client import GatewaySettings
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.model.moe_block import RoutedTime, SplitMoeBlock
from faasmoe.model.split_model import SplitModel
from faasmoe.planning.export import export
from faasmoe.planning.plan import Plan
from faasmoe.server.metrics import DECODE, PREFILL, Metrics
from faasmoe.server.process import ServeProcess
from tests.conftest import TEST_THREADS
from tests.reference import load_reference, reference_logits
from tests.test_remote_e2e import deploy

METRICS_KEY = "operator-metrics-breakdown"
KEY = "sk-breakdown-0001"
PROMPT = [11, 42, 7, 300, 5, 19, 77, 2, 64]
NEW_TOKENS = 6
STEP_PARTS = ("faasmoe_step_trunk_seconds", "faasmoe_step_expert_submit_seconds", "faasmoe_step_expert_wait_seconds")


@pytest.fixture(scope="module")
def functions(tiny_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Path]]:
    """The embedded gateway with a 4-experts-per-function plan of the bf16 model deployed."""
    plan = tmp_path_factory.mktemp("breakdown") / "plan"
    export(tiny_bf16, plan, experts_per_function=4)
    with GatewayProcess(log_path=plan.parent / "gateway.log") as gateway:
        deploy(gateway, plan)
        yield gateway, plan


def moe_blocks(model: SplitModel) -> list[SplitMoeBlock]:
    return [m for m in model.trunk.model.modules() if isinstance(m, SplitMoeBlock)]


def take(model: SplitModel) -> RoutedTime:
    total = RoutedTime()
    for block in moe_blocks(model):
        taken = block.routed_time.take()
        total.add(taken.submit_s, taken.wait_s)
    return total


def test_invocations_carry_compute_and_blocks_their_wait(tiny_bf16: Path, functions) -> None:
    gateway, plan = functions
    log = InvocationLog()
    remote = SplitModel.load(tiny_bf16, plan, partial(open_executor, gateway=GatewaySettings.from_url(gateway.url),
                                                      log=log))  # fmt: skip
    try:
        (logits,) = remote.trunk.step([remote.trunk.new_sequence(PROMPT)], all_logits=True)
        routed = take(remote)
    finally:
        remote.close()
    # Timing changed no tensor: bit-identical to unmodified transformers, as before.
    assert torch.equal(logits, reference_logits(load_reference(tiny_bf16), [PROMPT])[0])
    assert routed.submit_s > 0 and routed.wait_s > 0
    assert take(remote) == RoutedTime(), "take() resets the blocks"
    layers = len(moe_blocks(remote))
    assert len(log.invocations) >= layers
    for call in log.invocations:
        assert call.compute_seconds is not None, call
        assert 0 < call.compute_seconds <= call.seconds, call
        assert call.overhead_seconds == pytest.approx(call.seconds - call.compute_seconds)

    local = SplitModel.load(tiny_bf16, plan, open_executor)
    try:
        local.trunk.step([local.trunk.new_sequence(PROMPT)])
        in_process = take(local)
    finally:
        local.close()
    # In-process the experts compute inside submit; the result is there before anyone waits.
    assert in_process.submit_s > 0 and in_process.wait_s < in_process.submit_s


def test_breakdown_on_metrics_after_a_request_through_the_gateway(tiny_bf16: Path, functions, tmp_path: Path) -> None:
    gateway, plan = functions
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(yaml.safe_dump({"tenants": [{"name": "alpha", "api_keys": [KEY]}]}))
    args = ["--model", str(tiny_bf16), "--plan", str(plan), "--tenants", str(tenants), "--gateway", gateway.url,
            "--threads", str(TEST_THREADS), "--metrics-key", METRICS_KEY]  # fmt: skip
    with ServeProcess(args=args, log_path=tmp_path / "serve.log") as server:
        body = {"model": "tiny-bf16", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {KEY}"}
        done = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=60, trust_env=False)
        assert done.status_code == 200, done.text
        page = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, trust_env=False)
    assert page.status_code == 200, page.text
    scrape = Scrape.parse(page.text)
    for phase, steps in ((PREFILL, 1), (DECODE, NEW_TOKENS - 1)):
        step = scrape.histogram("faasmoe_step_seconds", engine="shared", phase=phase)
        assert step.count == steps, phase
        parts = [scrape.histogram(name, engine="shared", phase=phase) for name in STEP_PARTS]
        assert [part.count for part in parts] == [steps] * 3, phase
        # No step failed: each step's parts add up to it exactly (trunk is the rest).
        assert sum(part.sum for part in parts) == pytest.approx(step.sum, rel=1e-9, abs=1e-9)
        assert parts[2].sum > 0, "the trunk waited for the functions"
    compute = scrape.histogram("faasmoe_function_compute_seconds")
    overhead = scrape.histogram("faasmoe_function_overhead_seconds")
    latency = scrape.histogram("faasmoe_function_latency_seconds")
    assert compute.count == overhead.count >= 1  # warm calls: a replica's first call may have been cold
    assert latency.count >= compute.count
    assert 0 < compute.sum < latency.sum and overhead.sum > 0
    # The benchmark reads the same page into its figures.
    figures = step_figures(Scrape(), scrape)
    assert figures.decode_steps == NEW_TOKENS - 1
    assert figures.expert_wait_s is not None and figures.expert_wait_s > 0
    assert figures.calls_per_step is not None and figures.calls_per_step >= len(Plan.load(plan).model.moe_layers)
    assert figures.call_overhead_s.p50 is not None and 0 < figures.call_overhead_s.p50 <= figures.call_overhead_s.p99


def test_window_figures_from_a_metrics_page() -> None:
    """Two renders of one Metrics: the window is their difference; cold calls are no overhead."""
    metrics = Metrics()
    metrics.observe_step("shared", PREFILL, 2, 0.5, RoutedTime(0.1, 0.2))
    before = Scrape.parse(metrics.render({}).decode())
    for wait in (0.004, 0.006):
        metrics.observe_step("shared", DECODE, 2, 0.02, RoutedTime(0.002, wait))
    calls = [Invocation("f", 0.00495, 1, 1, False, 0.0045), Invocation("f", 0.00595, 1, 1, False, 0.0055)]
    for call in [*calls, Invocation("f", 2.0, 1, 1, True, 0.004)]:
        metrics.observe_invocation(call)
    figures = step_figures(before, Scrape.parse(metrics.render({}).decode()))
    assert figures.decode_steps == 2
    assert figures.step_s.mean == pytest.approx(0.02)
    assert (figures.trunk_s, figures.expert_submit_s, figures.expert_wait_s) == pytest.approx((0.013, 0.002, 0.005))
    assert figures.calls_per_step == pytest.approx(1.5)  # 3 calls over the window's 2 steps
    assert figures.call_compute_s.mean == pytest.approx(0.005)
    assert figures.call_overhead_s.mean == pytest.approx(0.00045)
    # Both overheads (0.45 ms) fall in the (0.4, 0.5] ms bucket: its interpolation stays inside it.
    assert 0.0004 <= figures.call_overhead_s.p50 <= figures.call_overhead_s.p99 <= 0.0005
