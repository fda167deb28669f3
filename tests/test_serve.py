"""The control plane end to end: `faasmoe serve` over the embedded gateway and real function processes,
reached through real HTTP (httpx and the official openai client)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.planning.export import export
from faasmoe.process import wait_until
from faasmoe.server.process import ServeProcess
from tests.conftest import TEST_THREADS
from tests.reference import load_reference, reference_greedy
from tests.test_remote_e2e import deploy

MODEL = "tiny-fp32"  # the served model name: the checkpoint folder's name
KEYS = {"alpha": "sk-alpha-0001", "beta": "sk-beta-0002", "gamma": "sk-gamma-0003"}
LIMITED_KEY = "sk-limited-0004"
OTHER_MODEL_KEY = "sk-other-0005"
METRICS_KEY = "operator-metrics-0006"  # the operator's: opens /metrics, no tenant's key does
TENANTS = {
    "tenants": [
        *({"name": name, "api_keys": [key]} for name, key in KEYS.items()),
        {"name": "limited", "api_keys": [LIMITED_KEY], "max_concurrent": 1, "max_tokens": 40, "tokens_per_minute": 150},
        {"name": "other", "api_keys": [OTHER_MODEL_KEY], "models": ["some-other-model"]},
    ]
}
PROMPTS = [[11, 42, 7, 300, 5, 19, 77, 2, 64], [5, 9, 120, 33], [400, 401, 3, 3, 17, 250]]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def stack(tiny_fp32: Path, tmp_path_factory: pytest.TempPathFactory):
    """Gateway + deployed functions (5 experts each) + a shared-mode control plane."""
    work = tmp_path_factory.mktemp("serve")
    export(tiny_fp32, work / "plan", experts_per_function=5)
    tenants = work / "tenants.yaml"
    tenants.write_text(yaml.safe_dump(TENANTS))
    with GatewayProcess(log_path=work / "gateway.log") as gateway:
        deploy(gateway, work / "plan")
        args = ["--model", str(tiny_fp32), "--plan", str(work / "plan"), "--tenants", str(tenants),
                "--gateway", gateway.url, "--threads", str(TEST_THREADS), "--metrics-key", METRICS_KEY]  # fmt: skip
        with ServeProcess(args=args, log_path=work / "serve.log") as server:
            yield Stack(tiny_fp32, work, gateway, server, args)


class Stack:
    def __init__(self, model: Path, work: Path, gateway: GatewayProcess, server: ServeProcess, args: list[str]):
        self.model, self.work, self.gateway, self.server, self.args = model, work, gateway, server, args

    def post(self, path: str, key: str | None, body: dict | bytes) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        content = body if isinstance(body, bytes) else None
        return httpx.post(self.server.url + path, headers=headers, json=None if content else body, content=content,
                          timeout=60, trust_env=False)  # fmt: skip

    def metrics(self) -> str:
        return read_metrics(self.server.url)


def read_metrics(url: str) -> str:
    response = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, trust_env=False)
    assert response.status_code == 200, response.text
    return response.text


def tokenizer_of(stack: Stack):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stack.model)


def completion_body(prompt: list[int], max_tokens: int = NEW_TOKENS, **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **extra}  # fmt: skip


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series of a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.startswith(name + "{") or series == name:
            found = dict(re.findall(r'(\w+)="([^"]*)"', series))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(value)
    return 0.0


def test_openai_client_completions_and_streamed_chat_for_two_tenants(stack: Stack):
    alpha = openai.OpenAI(base_url=stack.server.url + "/v1", api_key=KEYS["alpha"], max_retries=0)
    beta = openai.OpenAI(base_url=stack.server.url + "/tenants/beta/v1", api_key=KEYS["beta"], max_retries=0)

    assert [m.id for m in alpha.models.list().data] == [MODEL]
    completion = alpha.completions.create(model=MODEL, prompt="hello world", max_tokens=6, temperature=0)
    assert completion.object == "text_completion"
    assert completion.usage.prompt_tokens == len(tokenizer_of(stack).encode("hello world"))
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert 1 <= completion.usage.completion_tokens <= 6

    messages = [{"role": "user", "content": "Say something."}]
    whole = beta.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    stream = beta.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
                                          stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert whole.choices[0].finish_reason in ("stop", "length")


def test_concurrent_tenants_get_exactly_their_tokens_alone_and_transformers(stack: Stack):
    alone = [stack.post("/v1/completions", KEYS["alpha"], completion_body(p)).json() for p in PROMPTS]
    alone_ids = [r["choices"][0]["token_ids"] for r in alone]
    assert alone_ids == reference_greedy(load_reference(stack.model), PROMPTS, NEW_TOKENS)
    assert [r["choices"][0]["prompt_token_ids"] for r in alone] == PROMPTS
    assert all(r["usage"] == {"prompt_tokens": len(p), "completion_tokens": NEW_TOKENS,
                              "total_tokens": len(p) + NEW_TOKENS}
               for r, p in zip(alone, PROMPTS, strict=True))  # fmt: skip

    assert asyncio.run(every_tenant_at_once(stack.server.url)) == alone_ids * len(KEYS)


async def every_tenant_at_once(url: str) -> list[list[int]]:
    """Every tenant's completions of every prompt, all in flight together: the token ids of each."""
    async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False) as client:
        calls = [client.post("/v1/completions", json=completion_body(p), headers={"Authorization": f"Bearer {k}"})
                 for k in KEYS.values() for p in PROMPTS]  # fmt: skip
        return [r.json()["choices"][0]["token_ids"] for r in await asyncio.gather(*calls)]


def test_streamed_tokens_equal_the_whole_response(stack: Stack):
    body = completion_body(PROMPTS[0], logprobs=2)
    whole = stack.post("/v1/completions", KEYS["gamma"], body).json()["choices"][0]
    headers = {"Authorization": f"Bearer {KEYS['gamma']}"}
    url = stack.server.url + "/v1/completions"
    with httpx.stream("POST", url, json=body | {"stream": True}, headers=headers, trust_env=False) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]  # fmt: skip
    assert events[-1] == "[DONE]"
    chunks = [httpx.Response(200, content=e).json()["choices"][0] for e in events[:-1]]
    assert [t for c in chunks for t in c["token_ids"]] == whole["token_ids"]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["finish_reason"] == whole["finish_reason"] == "length"
    assert len(whole["logprobs"]["token_logprobs"]) == NEW_TOKENS
    # keyed by token text, as OpenAI does: two ids that decode alike (partial UTF-8) share a key
    assert all(1 <= len(top) <= 2 for top in whole["logprobs"]["top_logprobs"])
    assert all(max(top.values()) >= chosen - 1e-6 for top, chosen in
               zip(whole["logprobs"]["top_logprobs"], whole["logprobs"]["token_logprobs"], strict=True))  # fmt: skip


def test_a_stop_string_cuts_the_text_alike_streamed_and_whole(stack: Stack):
    free = stack.post("/v1/completions", KEYS["gamma"], completion_body(PROMPTS[1], max_tokens=16)).json()["choices"][0]
    text = free["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # from the middle: text on both sides of the cut
    assert len(stop) == 3 and "\ufffd" not in stop, text
    body = completion_body(PROMPTS[1], max_tokens=16, stop=[stop])
    whole = stack.post("/v1/completions", KEYS["gamma"], body).json()["choices"][0]
    assert (whole["text"], whole["finish_reason"]) == (text[: text.find(stop)], "stop")
    assert whole["token_ids"] == free["token_ids"][: len(whole["token_ids"])] and len(whole["token_ids"]) < 16
    headers = {"Authorization": f"Bearer {KEYS['gamma']}"}
    url = stack.server.url + "/v1/completions"
    with httpx.stream("POST", url, json=body | {"stream": True}, headers=headers, trust_env=False) as response:
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]  # fmt: skip
    chunks = [httpx.Response(200, content=e).json()["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["finish_reason"] == "stop"


def test_auth_failures(stack: Stack):
    body = completion_body(PROMPTS[0], max_tokens=2)
    missing = stack.post("/v1/completions", None, body)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert stack.post("/v1/completions", "sk-not-a-real-key", body).status_code == 401
    wrong_path = stack.post("/tenants/beta/v1/completions", KEYS["alpha"], body)
    assert wrong_path.status_code == 403 and "alpha" in wrong_path.json()["error"]["message"]
    assert stack.post("/tenants/alpha/v1/completions", KEYS["alpha"], body).status_code == 200
    not_allowed = stack.post("/v1/completions", OTHER_MODEL_KEY, body)
    assert not_allowed.status_code == 403 and not_allowed.json()["error"]["param"] == "model"
    models = httpx.get(stack.server.url + "/v1/models", headers={"Authorization": f"Bearer {OTHER_MODEL_KEY}"},
                       trust_env=False)  # fmt: skip
    assert models.json()["data"] == []


def test_quotas_429_while_another_tenant_proceeds(stack: Stack):
    over = stack.post("/v1/completions", LIMITED_KEY, completion_body(PROMPTS[1], max_tokens=41))
    assert over.status_code == 429 and "Retry-After" in over.headers

    async def scenario() -> tuple[list[int], int, list[int]]:
        async with httpx.AsyncClient(base_url=stack.server.url, timeout=120, trust_env=False) as client:
            limited = {"Authorization": f"Bearer {LIMITED_KEY}"}
            long = client.build_request("POST", "/v1/completions", headers=limited,
                                        json=completion_body(PROMPTS[1], max_tokens=40, stream=True))  # fmt: skip
            response = await client.send(long, stream=True)
            lines = response.aiter_lines()
            while not (await anext(lines)).startswith("data: "):  # the request is generating now
                pass
            second = await client.post("/v1/completions", headers=limited, json=completion_body(PROMPTS[1], 4))
            other = await client.post("/v1/completions", headers={"Authorization": f"Bearer {KEYS['beta']}"},
                                      json=completion_body(PROMPTS[1]))  # fmt: skip
            async for _ in lines:
                pass
            await response.aclose()
            return second.status_code, second.headers.get("Retry-After"), other.json()["choices"][0]["token_ids"]

    status, retry_after, beta_tokens = asyncio.run(scenario())
    assert status == 429 and int(retry_after) >= 1
    assert len(beta_tokens) == NEW_TOKENS  # beta is unaffected by limited's quota
    # 4 + 40 tokens were used; 150 per minute leaves room for two more 4 + 40 requests, not three.
    statuses = [stack.post("/v1/completions", LIMITED_KEY, completion_body(PROMPTS[1], 40)).status_code
                for _ in range(3)]  # fmt: skip
    assert statuses == [200, 200, 429]
    assert stack.post("/v1/completions", KEYS["beta"], completion_body(PROMPTS[1], 2)).status_code == 200


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"model": "tiny-fp32", "prompt": [1, 2', 400),  # invalid JSON
        (b"[1, 2, 3]", 400),  # not an object
        ({"model": MODEL, "prompt": [1, 2], "max_tokens": "ten"}, 400),
        ({"model": MODEL, "prompt": [1, 2], "max_tokens": -1}, 400),
        ({"model": MODEL, "prompt": [1, 2], "temperature": 5}, 400),
        ({"model": MODEL, "prompt": [1, 2], "n": 2}, 400),
        ({"model": MODEL, "prompt": []}, 400),
        ({"model": MODEL, "prompt": [1, 2, 512]}, 400),  # the vocabulary is 512 tokens
        ({"model": MODEL, "prompt": [-1]}, 400),
        ({"model": MODEL, "prompt": [5] * 600}, 400),  # over the 512-token context
        ({"model": MODEL, "prompt": [5] * 500, "max_tokens": 20}, 400),  # prompt + max_tokens over the context
        ({"model": "no-such-model", "prompt": [1, 2]}, 404),
        ({"prompt": [1, 2]}, 400),  # no model
        ({"model": MODEL}, 400),  # no prompt
        ({"model": MODEL, "prompt": [1, 2], "seed": 2**64}, 400),  # over torch.Generator's range
        ({"model": MODEL, "prompt": [1, 2], "seed": -(2**63) - 1}, 400),
        ({"model": MODEL, "prompt": [1, 2], "top_p": 0}, 400),
        (b'{"model": "tiny-fp32", "prompt": "a\\ud800b"}', 400),  # a lone UTF-16 surrogate
        (b'{"model": "tiny-fp32", "prompt": ["\\udfff"]}', 400),
        (b'{"model": "tiny-fp32", "prompt": "ab", "stop": ["\\udc00"]}', 400),
        (b'{"model": "tiny\\ud800", "prompt": [1, 2]}', 400),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(stack: Stack, body, status):
    response = stack.post("/v1/completions", KEYS["gamma"], body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    good = stack.post("/v1/completions", KEYS["gamma"], completion_body(PROMPTS[2], 3))
    assert good.status_code == 200 and len(good.json()["choices"][0]["token_ids"]) == 3


def test_bad_chat_bodies(stack: Stack):
    for body in ({"model": MODEL, "messages": []}, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
                 {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3},
                 b'{"model": "tiny-fp32", "messages": [{"role": "user", "content": "a\\ud800"}]}',
                 b'{"model": "tiny-fp32", "messages": [{"role": "user", "content": [{"type": "text", '
                 b'"text": "\\udbff"}]}]}'):  # fmt: skip
        response = stack.post("/v1/chat/completions", KEYS["alpha"], body)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_degenerate_temperature_and_top_p_are_computed_and_fail_no_one(stack: Stack):
    """The issue's case: tiny temperature / top_p in a shared batch of two tenants used to fail all 8 with 500.

    Both are computed exactly: a tiny temperature, or a nucleus that keeps only the likeliest token, is
    greedy decoding when the maximum is unique, as in this model, so every request gets the greedy tokens.
    """
    extras = [{"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 5e-324, "top_p": 0.5},
              {"temperature": 0}]  # fmt: skip
    cases = [(key, i % len(PROMPTS), extra) for key in (KEYS["alpha"], KEYS["beta"]) for i, extra in enumerate(extras)]

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=stack.server.url, timeout=120, trust_env=False) as client:
            return await asyncio.gather(*(
                client.post("/v1/completions", json=completion_body(PROMPTS[p], seed=2**64 - 1, **extra),
                            headers={"Authorization": f"Bearer {key}"})
                for key, p, extra in cases))  # fmt: skip

    responses = asyncio.run(together())
    assert [r.status_code for r in responses] == [200] * len(cases), [r.text for r in responses]
    greedy = reference_greedy(load_reference(stack.model), PROMPTS, NEW_TOKENS)
    assert [r.json()["choices"][0]["token_ids"] for r in responses] == [greedy[p] for _, p, _ in cases]


def test_metrics_open_only_with_the_operators_key(stack: Stack):
    url = stack.server.url + "/metrics"
    missing = httpx.get(url, trust_env=False)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    for key in KEYS.values():
        tenant = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, trust_env=False)
        assert tenant.status_code == 403 and tenant.json()["error"]["code"] == "metrics_key_required"
        assert "faasmoe_" not in tenant.text
    wrong = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_KEY}x"}, trust_env=False)
    assert wrong.status_code == 401 and METRICS_KEY not in wrong.text
    page = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_KEY}"}, trust_env=False)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    assert metric(page.text, "faasmoe_request_errors_total", tenant="", type="authentication_error") >= 2


def test_a_body_over_the_limit_gets_413_without_being_read_whole(stack: Stack):
    limit = 4 * 2**20  # ServeSettings.max_body_bytes' default
    declared = stack.post("/v1/completions", KEYS["alpha"], b" " * (limit + 1))
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"
    sent = 0

    def endless() -> Iterator[bytes]:  # chunked, no Content-Length: the server must stop reading on its own
        nonlocal sent
        while sent < 64 * limit:
            sent += 2**16
            yield b" " * 2**16

    headers = {"Authorization": f"Bearer {KEYS['alpha']}", "Content-Type": "application/json"}
    chunked = httpx.post(stack.server.url + "/v1/completions", content=endless(), headers=headers, timeout=60,
                         trust_env=False)  # fmt: skip
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    assert sent < 8 * limit  # the limit, plus what the sockets' buffers held
    good = stack.post("/v1/completions", KEYS["alpha"], completion_body(PROMPTS[2], 3))
    assert good.status_code == 200 and len(good.json()["choices"][0]["token_ids"]) == 3


def test_disconnected_stream_frees_its_sequence(stack: Stack):
    before = metric(stack.metrics(), "faasmoe_tokens_total", tenant="beta", kind="completion")
    body = completion_body(PROMPTS[0], max_tokens=400, stream=True)
    with httpx.stream("POST", stack.server.url + "/v1/completions", json=body, trust_env=False, timeout=60,
                      headers={"Authorization": f"Bearer {KEYS['beta']}"}) as response:  # fmt: skip
        lines = response.iter_lines()
        for _ in range(3):
            while not next(lines).startswith("data: "):
                pass
    freed = wait_until(lambda: metric(stack.metrics(), "faasmoe_active_sequences", engine="shared") == 0, 30)
    assert freed, "the sequence was not freed"
    generated = metric(stack.metrics(), "faasmoe_tokens_total", tenant="beta", kind="completion") - before
    assert 3 <= generated < 400


def test_metrics_expose_tenant_and_function_series(stack: Stack):
    refused = metric(stack.metrics(), "faasmoe_request_errors_total", tenant="", type="authentication_error")
    assert stack.post("/v1/completions", "sk-not-a-real-key", completion_body(PROMPTS[0], 3)).status_code == 401
    stack.post("/v1/completions", KEYS["alpha"], completion_body(PROMPTS[0], 3))
    page = stack.metrics()
    assert metric(page, "faasmoe_requests_total", tenant="alpha", endpoint="/v1/completions", status="200") >= 1
    assert metric(page, "faasmoe_tokens_total", tenant="alpha", kind="prompt") >= len(PROMPTS[0])
    assert metric(page, "faasmoe_time_to_first_token_seconds_count", tenant="alpha") >= 1
    assert metric(page, "faasmoe_time_per_output_token_seconds_count", tenant="alpha") >= 2
    # Counted before the 401 is sent; no tenant: the key named none.
    assert metric(page, "faasmoe_request_errors_total", tenant="", type="authentication_error") == refused + 1
    function = "moe-l00-e000-004"
    assert metric(page, "faasmoe_function_invocations_total", function=function) >= 1
    assert metric(page, "faasmoe_function_latency_seconds_count", function=function) >= 1
    assert metric(page, "faasmoe_function_bytes_total", function=function, direction="sent") > 0
    assert metric(page, "faasmoe_function_cold_starts_total", function=function) >= 1
    assert metric(page, "faasmoe_function_replicas", function=function) == 1
    assert metric(page, "faasmoe_control_plane_memory_bytes", kind="rss") > 0


def test_private_mode_gives_the_same_tokens(stack: Stack):
    args = [*stack.args, "--mode", "private"]
    with ServeProcess(args=args, log_path=stack.work / "serve-private.log") as private:
        assert httpx.get(private.url + "/ready", trust_env=False).json()["mode"] == "private"
        for key in (KEYS["alpha"], KEYS["beta"]):
            response = httpx.post(private.url + "/v1/completions", json=completion_body(PROMPTS[1]), timeout=60,
                                  headers={"Authorization": f"Bearer {key}"}, trust_env=False)  # fmt: skip
            shared = stack.post("/v1/completions", key, completion_body(PROMPTS[1]))
            assert response.json()["choices"][0]["token_ids"] == shared.json()["choices"][0]["token_ids"]
        page = read_metrics(private.url)
        assert metric(page, "faasmoe_step_tokens_count", engine="alpha") >= 1
        assert metric(page, "faasmoe_step_tokens_count", engine="beta") >= 1


def test_two_micro_batches_give_every_tenant_the_transformers_tokens(stack: Stack):
    args = [*stack.args, "--micro-batches", "2"]
    expected = reference_greedy(load_reference(stack.model), PROMPTS, NEW_TOKENS)
    with ServeProcess(args=args, log_path=stack.work / "serve-micro.log") as server:
        # concurrent requests: steps of several sequences, each split in two
        assert asyncio.run(every_tenant_at_once(server.url)) == expected * len(KEYS)
