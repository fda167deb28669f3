"""Schemathesis against the live control plane's own OpenAPI schema: no 5xx, answers as documented.

A real `faasmoe serve` (experts in-process) is fuzzed through every operation of its /openapi.json,
tenant-scoped paths included, with valid and invalid data: each answer must be no 5xx, of a documented
status and content type, and match the documented body. Every tenant's probe prompts give transformers'
greedy tokens before the fuzz and after it, when the server must still run and have counted no 5xx.
Bounded to well under a minute of fuzzing.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode

from faasmoe.planning.export import export
from faasmoe.server.process import ServeProcess
from tests.conftest import TEST_THREADS
from tests.reference import load_reference, reference_greedy

MODEL = "tiny-fp32"  # the served model name: the checkpoint folder's name
KEYS = {"alpha": "sk-fuzz-alpha-0001", "beta": "sk-fuzz-beta-0002"}
METRICS_KEY = "operator-fuzz-0003"
MAX_TOKENS = 16  # each tenant's max_tokens quota: fuzzed generations stay short
TENANTS = {"tenants": [{"name": name, "api_keys": [key], "max_tokens": MAX_TOKENS} for name, key in KEYS.items()]}
PROBES = [[11, 42, 7, 300, 5, 19, 77, 2, 64], [5, 9, 120, 33], [400, 401, 3, 3, 17, 250]]
NEW_TOKENS = 8
FUZZ_SETTINGS = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(HealthCheck))  # fmt: skip
SCHEMATHESIS = schemathesis.Config.from_dict(
    {
        # Mostly the key's own tenant and the served model, so valid bodies get past the 403 and 404.
        "dictionaries": {"tenant": {"values": ["alpha"]}, "model": {"values": [MODEL]}},
        "parameters": {
            "path.tenant": {"dictionary": "tenant", "probability": 0.8},
            "body.model": {"dictionary": "model", "probability": 0.8},
        },
        # Every built-in check runs; these are the ones this test is about.
        "checks": {
            "not_a_server_error": {"enabled": True},
            "status_code_conformance": {"enabled": True},
            "content_type_conformance": {"enabled": True},
            "response_schema_conformance": {"enabled": True},
            # Valid data may still be refused: prompt ids past the vocabulary, max_tokens over a quota.
            "positive_data_acceptance": {"enabled": False},
        },
        "request-timeout": 60,
    }
)


@pytest.fixture(scope="module")
def server(tiny_fp32: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("api-fuzz")
    export(tiny_fp32, work / "plan", experts_per_function=5)
    tenants = work / "tenants.yaml"
    tenants.write_text(yaml.safe_dump(TENANTS))
    args = ["--model", str(tiny_fp32), "--plan", str(work / "plan"), "--tenants", str(tenants),
            "--threads", str(TEST_THREADS), "--metrics-key", METRICS_KEY]  # fmt: skip
    # Chats without max_tokens default to the tenants' quota, so they are generated, not refused (429).
    env = {**os.environ, "FAASMOE_SERVE_DEFAULT_MAX_TOKENS": str(MAX_TOKENS)}
    with ServeProcess(args=args, env=env, log_path=work / "serve.log") as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny_fp32: Path) -> list[list[int]]:
    return reference_greedy(load_reference(tiny_fp32), PROBES, NEW_TOKENS)


def probe_tokens(url: str) -> dict[str, list[list[int]]]:
    """Each tenant's greedy tokens of PROBES, through its tenant-scoped path."""
    body = {"model": MODEL, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    tokens = {}
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        for name, key in KEYS.items():
            answers = [client.post(f"/tenants/{name}/v1/completions", json=body | {"prompt": prompt},
                                   headers={"Authorization": f"Bearer {key}"}) for prompt in PROBES]  # fmt: skip
            assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
            tokens[name] = [answer.json()["choices"][0]["token_ids"] for answer in answers]
    return tokens


def answers_counted(url: str) -> Counter[tuple[str, str]]:
    """How many requests the server answered, by route and status (all tenants), from its own /metrics."""
    page = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, trust_env=False)
    assert page.status_code == 200, page.text
    answers: Counter[tuple[str, str]] = Counter()
    for sample in (s for family in text_string_to_metric_families(page.text) for s in family.samples):
        if sample.name == "faasmoe_requests_total":
            answers[sample.labels["endpoint"], sample.labels["status"]] += int(sample.value)
    return answers


def server_errors(answers: Counter[tuple[str, str]]) -> int:
    return sum(count for (_, status), count in answers.items() if status.startswith("5"))


def test_schemathesis_finds_no_5xx_and_every_tenant_keeps_its_exact_tokens(server: ServeProcess,
                                                                             reference: list[list[int]]):  # fmt: skip
    expected = {name: reference for name in KEYS}
    assert probe_tokens(server.url) == expected
    before = answers_counted(server.url)
    assert server_errors(before) == 0
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", config=SCHEMATHESIS)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /tenants/{tenant}/v1/chat/completions", "GET /metrics"}

    for operation in operations:
        # The key is fixed, so invalid data reaches validation rather than a 401 for a mangled key.
        key = METRICS_KEY if operation.path == "/metrics" else KEYS["alpha"]
        auth = {"Authorization": f"Bearer {key}"}
        # Valid and invalid data alike (an operation without parameters has no invalid data).
        cases = st.one_of([operation.as_strategy(generation_mode=mode, headers=auth) for mode in GenerationMode])

        @FUZZ_SETTINGS
        @given(case=cases)
        def answers_as_documented(case: schemathesis.Case) -> None:
            case.call_and_validate()

        answers_as_documented()

    assert server.process is not None and server.process.poll() is None
    fuzzed = answers_counted(server.url) - before
    assert server_errors(fuzzed) == 0
    # Not vacuous: valid data got through to generations on both endpoints.
    assert fuzzed["/v1/completions", "200"] > 0 and fuzzed["/v1/chat/completions", "200"] > 0, sorted(fuzzed.items())
    assert probe_tokens(server.url) == expected


def test_the_schema_describes_the_real_routes(server: ServeProcess):
    schema = httpx.get(server.url + "/openapi.json", trust_env=False).json()
    operations = {(method, path): op for path, item in schema["paths"].items() for method, op in item.items()}
    for op in operations.values():
        assert "422" not in op["responses"]  # validation errors are answered 400
        errors = [answer for status, answer in op["responses"].items() if status[0] in "45" and "content" in answer]
        assert all(list(answer["content"]) == ["application/json"] for answer in errors)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path in ("/v1/completions", "/tenants/{tenant}/v1/completions", "/tenants/{tenant}/v1/chat/completions"):
        post = operations["post", path]
        assert list(post["responses"]["200"]["content"]) == ["application/json", "text/event-stream"]
        assert {"400", "401", "403", "404", "413", "429"} <= set(post["responses"])
        assert post["security"] == [{"TenantKey": []}]
    assert [p["name"] for p in operations["get", "/tenants/{tenant}/v1/models"]["parameters"]] == ["tenant"]
    metrics = operations["get", "/metrics"]
    assert list(metrics["responses"]["200"]["content"]) == ["text/plain"]
    assert metrics["security"] == [{"MetricsKey": []}]
    prompt = schema["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert prompt[0] == {"type": "string", "minLength": 1}  # an empty prompt is documented as invalid


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        # the body's own validator: named as such, not as a body that is no JSON object
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs needs logprobs", None),
        (b'{"model": "tiny-fp32", "messages": [', "must be a JSON object", None),  # not JSON: no offset as param
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ""}, "non-empty strings", "stop"),
    ],
)
def test_what_the_fuzz_found_is_a_clear_400(server: ServeProcess, body: dict | bytes, message: str, param: str | None):
    content = body if isinstance(body, bytes) else None
    json = None if content else {"model": MODEL, **body}
    answer = httpx.post(
        server.url + "/v1/chat/completions",
        json=json,
        content=content,
        trust_env=False,
        headers={"Authorization": f"Bearer {KEYS['alpha']}", "Content-Type": "application/json"},
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert message in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"
