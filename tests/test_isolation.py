"""A failure fails only what it concerns: one sequence's sampling or decoding ends that request alone,
a failed step ends its batch as the function tier's failure (502/503), and nothing raised while a
request is submitted keeps its quota slot. Tenants never see another's error, nor internal detail.

Faults no valid request can trigger are injected here: an engine-level request the API would refuse,
a tokenizer that fails on one token, a route that raises. The HTTP ones go through the real app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from functools import partial
from pathlib import Path

import httpx
import pytest

from faasmoe.dispatch.executor import open_executor
from faasmoe.gateway.client import GatewaySettings
from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.model.sampling import SamplingParams
from faasmoe.model.split_model import SplitModel
from faasmoe.planning.export import export
from faasmoe.process import free_port, wait_until
from faasmoe.server import completions
from faasmoe.server.api import create_app
from faasmoe.server.engine import Engine
from faasmoe.server.generation import TextStream
from faasmoe.server.middleware import REQUEST_ID_HEADER
from faasmoe.server.protocol import CompletionRequest
from faasmoe.server.sequence import Failure, FailureKind, FinishReason, Sequence, TokenEvent
from tests.app_server import AppServer, in_process_platform
from tests.reference import load_reference, reference_greedy
from tests.test_remote_e2e import deploy

MODEL = "tiny-fp32"
PROMPTS = [[11, 42, 7, 300, 5, 19, 77, 2, 64], [5, 9, 120, 33], [400, 401, 3, 3, 17, 250]]
NEW_TOKENS = 8
KEYS = {"alpha": "sk-alpha-0001", "beta": "sk-beta-0002"}
TENANTS = {
    "tenants": [
        *({"name": name, "api_keys": [key]} for name, key in KEYS.items()),
        {"name": "limited", "api_keys": ["sk-limited-0003"], "max_concurrent": 3},
    ]
}
INTERNAL_DETAIL = "/var/lib/faasmoe/secret-path"  # what an injected fault says; no tenant may read it


@pytest.fixture(scope="module")
def plan_dir(tiny_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    plan = tmp_path_factory.mktemp("isolation") / "plan"
    export(tiny_fp32, plan, experts_per_function=5)
    return plan


@pytest.fixture(scope="module")
def greedy(tiny_fp32: Path) -> list[list[int]]:
    """transformers' greedy tokens of PROMPTS: what each request gets, alone or not."""
    return reference_greedy(load_reference(tiny_fp32), PROMPTS, NEW_TOKENS)


def greedy_request(tenant: str, prompt: list[int], **fields) -> Sequence:
    return Sequence(tenant, prompt, SamplingParams(max_new_tokens=NEW_TOKENS), **fields)


def run_together(model: SplitModel, requests: list[Sequence]) -> list[list[TokenEvent]]:
    """Every request's events; all are queued before the engine starts, so they share its steps."""

    async def collect(seq: Sequence) -> list[TokenEvent]:
        return [event async for event in seq.stream()]

    async def go() -> list[list[TokenEvent]]:
        engine = Engine(model, name="test")
        for seq in requests:
            engine.submit(seq)
        engine.start()
        try:
            return [await collect(seq) for seq in requests]
        finally:
            engine.stop()

    return asyncio.run(go())


def tokens(events: list[TokenEvent]) -> list[int]:
    assert all(e.failure is None for e in events)
    return [e.token_id for e in events]


def test_a_sequence_whose_sampling_fails_ends_alone_and_its_batch_gets_exact_tokens(tiny_fp32, plan_dir, greedy):
    model = SplitModel.load(tiny_fp32, plan_dir, open_executor)
    try:
        # logprobs over the vocabulary: its top-k raises, in this sequence's share of the step only
        failing = greedy_request("beta", PROMPTS[1], logprobs=10**6)
        requests = [greedy_request("alpha", PROMPTS[0]), failing, greedy_request("gamma", PROMPTS[2])]
        events = run_together(model, requests)
    finally:
        model.close()
    assert tokens(events[0]) == greedy[0]
    assert events[1] == [TokenEvent(None, finish_reason=FinishReason.ERROR, failure=Failure(FailureKind.SEQUENCE))]
    assert tokens(events[2]) == greedy[2]


@pytest.mark.parametrize(("gateway_up", "kind", "status"), [(True, FailureKind.FUNCTION, 502),
                                                          (False, FailureKind.FUNCTION_UNAVAILABLE, 503)])  # fmt: skip
def test_a_failed_step_ends_its_batch_as_the_function_tiers_failure(tiny_fp32, plan_dir, tmp_path, gateway_up, kind,
                                                                     status):  # fmt: skip
    """Functions whose shards are gone (each answers its load failure, 500), or no gateway at all (nothing answers)."""
    with GatewayProcess(log_path=tmp_path / "gateway.log") if gateway_up else contextlib.nullcontext() as gateway:
        url = gateway.url if gateway_up else f"http://127.0.0.1:{free_port('127.0.0.1')}"
        if gateway_up:
            shardless = tmp_path / "shardless-plan"
            shutil.copytree(plan_dir, shardless, ignore=shutil.ignore_patterns("*.safetensors"))
            deploy(gateway, shardless)
        model = SplitModel.load(tiny_fp32, plan_dir, partial(open_executor, gateway=GatewaySettings(base_url=url)))
        try:
            events = run_together(model, [greedy_request("alpha", PROMPTS[0]), greedy_request("beta", PROMPTS[1])])
        finally:
            model.close()
    layer0 = {f.name for f in model.plan.functions if 0 in f.layers}
    failures = [e.failure for request_events in events for e in request_events]
    assert len(failures) == 2 and failures[0] == failures[1]
    assert failures[0].kind is kind and failures[0].function in layer0
    error = completions.failure_error(failures[0], "req_1")
    assert error.status == status and error.body.error.type == "server_error"
    assert failures[0].function in error.body.error.message and "req_1" in error.body.error.message
    assert "127.0.0.1" not in error.body.error.message


@pytest.fixture(scope="module")
def platform(tiny_fp32: Path, plan_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    platform = in_process_platform(tiny_fp32, plan_dir, TENANTS, tmp_path_factory.mktemp("platform"))
    yield platform
    platform.stop()


def test_nothing_raised_while_submitting_keeps_the_quota_slot(platform):
    """The issue's case: a seed torch refuses raised while starting the request; 3 locked max_concurrent 3 out.

    The API refuses such seeds now (400), so the engine-level fault is sent past validation here.
    """
    limited = platform.tenants.tenants["limited"]
    body = CompletionRequest.model_construct(model=MODEL, prompt=PROMPTS[1], max_tokens=4, temperature=1.0, top_p=1.0,
                                             seed=2**64, stop=[], ignore_eos=True, logprobs=None)  # fmt: skip

    async def submit() -> None:
        completions._start(platform, limited, body, "req_test")

    for _ in range(limited.config.max_concurrent + 1):
        with pytest.raises(ValueError, match="Overflow"):
            asyncio.run(submit())
    assert limited.in_flight == 0


def local_port(response: httpx.Response) -> int:
    """The client's port of the connection a response came on: equal ports, one kept-alive connection."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_an_unexpected_error_is_a_500_object_and_keeps_the_connection(platform):
    app = create_app(platform)

    @app.get("/fault")
    async def fault() -> None:
        raise RuntimeError(f"injected fault in {INTERNAL_DETAIL}")

    with AppServer(app) as server, httpx.Client(base_url=server.url, trust_env=False) as client:
        failed = client.get("/fault")
        assert failed.status_code == 500, failed.text
        error = failed.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "internal_error"
        assert failed.headers[REQUEST_ID_HEADER] in error["message"] and INTERNAL_DETAIL not in failed.text
        after = client.get("/v1/models", headers={"Authorization": f"Bearer {KEYS['alpha']}"})
        assert after.status_code == 200 and local_port(after) == local_port(failed)


def failing_on(poison: int):
    """TextStream.add as served, except that detokenizing `poison` raises (a fault no valid request makes)."""
    add = TextStream.add

    def add_or_fail(self: TextStream, token_id: int) -> str:
        if token_id == poison:
            raise RuntimeError(f"injected decode fault in {INTERNAL_DETAIL}")
        return add(self, token_id)

    return add_or_fail


def body(prompt: list[int], **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **extra}  # fmt: skip


def test_a_request_whose_detokenizing_fails_fails_alone(platform, greedy, monkeypatch):
    poison = next(t for t in greedy[0][1:] if t not in greedy[1])  # alpha's 2nd token on, never in beta's
    with monkeypatch.context() as patch:
        patch.setattr(TextStream, "add", failing_on(poison))
        with AppServer(create_app(platform)) as server:

            async def together() -> tuple[httpx.Response, list[str], httpx.Response]:
                async with httpx.AsyncClient(base_url=server.url, timeout=60, trust_env=False) as client:
                    alpha = {"Authorization": f"Bearer {KEYS['alpha']}"}

                    async def stream() -> list[str]:
                        async with client.stream("POST", "/v1/completions", json=body(PROMPTS[0], stream=True),
                                                 headers=alpha) as response:  # fmt: skip
                            return [line async for line in response.aiter_lines() if line.startswith("data: ")]

                    return await asyncio.gather(
                        client.post("/v1/completions", json=body(PROMPTS[0]), headers=alpha),
                        stream(),
                        client.post("/v1/completions", json=body(PROMPTS[1]),
                                    headers={"Authorization": f"Bearer {KEYS['beta']}"}),
                    )  # fmt: skip

            whole, events, beta = asyncio.run(together())
    assert whole.status_code == 500 and whole.json()["error"]["code"] == "generation_failed"
    assert whole.headers[REQUEST_ID_HEADER] in whole.json()["error"]["message"]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["error"]["code"] == "generation_failed"
    assert [t for c in chunks[:-1] for t in c["choices"][0]["token_ids"]] == greedy[0][: greedy[0].index(poison)]
    assert beta.status_code == 200 and beta.json()["choices"][0]["token_ids"] == greedy[1]
    assert all(INTERNAL_DETAIL not in text for text in (whole.text, beta.text, *events))
    assert wait_until(lambda: sum(platform.orchestrator.active_sequences().values()) == 0, 10)  # KV caches freed
    assert platform.tenants.tenants["alpha"].in_flight == 0
