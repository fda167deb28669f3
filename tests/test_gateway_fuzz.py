"""Property-based fuzzing of the embedded gateway's HTTP API against a real gateway process.

/system/* gets arbitrary methods, paths, names, headers and bodies (deployment documents built field by
field, valid and not, and arbitrary JSON and bytes); /function/* gets arbitrary methods, paths, queries,
headers and bodies. The properties: no 5xx but the documented function failures (500 failed to load,
502 crashed, on /function/* only), the gateway stays healthy, and once the fuzzed functions are deleted
no process of theirs is left. Examples are derandomized and bounded, so the run takes seconds.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.gateway.schemas import (
    ANNOTATION_READY_PATH,
    LABEL_SCALE_MAX,
    LABEL_SCALE_MIN,
    LABEL_SCALE_ZERO,
    LABEL_SCALE_ZERO_DURATION,
)
from tests.test_gateway_api import ECHO_FUNCTION, wait_until

FUZZ = settings(max_examples=120, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
# The fuzz deploys only these names (and a few invalid ones), so that its functions can all be deleted.
FUZZ_NAMES = ["fz-a", "fz-b", "fz-c"]
STEADY = "fz-steady"  # deployed once, never touched by the /system fuzz: its invocations must all succeed
FUNCTION_FAILURES = {500, 502}
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    logs = tmp_path_factory.mktemp("fuzz-gateway")
    args = ["--function-command", f"{sys.executable} {ECHO_FUNCTION}", "--log-dir", str(logs),
            "--cold-start-timeout", "10", "--reaper-interval", "0.2", "--allow-env-var", "TEST_FUNCTION"]  # fmt: skip
    with GatewayProcess(args=args, log_path=logs / "gateway.log") as process:
        with httpx.Client(base_url=process.url, trust_env=False) as http:
            body = {"service": STEADY, "image": "echo", "envVars": {"TEST_FUNCTION": STEADY}}
            assert http.post("/system/functions", json=body).status_code == 202
        yield process


@pytest.fixture(scope="module")
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30.0, trust_env=False) as client:
        yield client


# --- strategies ------------------------------------------------------------------------------------

TEXT = st.text(max_size=12)
NAMES = st.sampled_from(FUZZ_NAMES) | st.sampled_from(["", "Bad_Name", "a" * 64, "x\n", "../etc", "-a", "fz-a."]) | TEXT
LABEL_VALUES = st.sampled_from(["0", "1", "2", "-1", "true", "false", "maybe", "1s", "5m", "0s", "1d", "", "x"])
LABELS = st.dictionaries(
    st.sampled_from([LABEL_SCALE_MIN, LABEL_SCALE_MAX, LABEL_SCALE_ZERO, LABEL_SCALE_ZERO_DURATION]) | TEXT,
    LABEL_VALUES,
    max_size=4,
)
ENV_VARS = st.dictionaries(
    st.sampled_from(["TEST_FUNCTION", "FAASMOE_THREADS", "OMP_NUM_THREADS", "LD_PRELOAD", "PYTHONPATH", "A=B", ""])
    | TEXT,
    TEXT,
    max_size=3,
)
READY_PATHS = st.sampled_from(["/ready", "ready", "/ready?x=1", "/ready\n", "/re ady", "http://evil/", "//x", ""])
RESOURCES = st.none() | st.fixed_dictionaries({}, optional={"memory": TEXT, "cpu": TEXT}) | TEXT
# Deployments that pass every check (so functions get deployed, updated, scaled, started) and ones that may not.
VALID_DEPLOYMENT = st.fixed_dictionaries(
    {"service": st.sampled_from(FUZZ_NAMES), "image": TEXT},
    optional={
        "envVars": st.dictionaries(st.sampled_from(["TEST_FUNCTION", "FAASMOE_THREADS", "OMP_NUM_THREADS"]), TEXT),
        "labels": st.fixed_dictionaries(
            {},
            optional={
                LABEL_SCALE_MIN: st.sampled_from(["0", "1"]),
                LABEL_SCALE_MAX: st.sampled_from(["1", "2"]),
                LABEL_SCALE_ZERO: st.sampled_from(["true", "false"]),
                LABEL_SCALE_ZERO_DURATION: st.sampled_from(["1s", "5m"]),
            },
        ),
        "annotations": st.just({ANNOTATION_READY_PATH: "/ready"}),
        "limits": st.just({"memory": "128Mi"}),
    },
)
DEPLOYMENT = VALID_DEPLOYMENT | st.fixed_dictionaries(
    {"service": NAMES},
    optional={
        "image": TEXT | st.integers(),
        "namespace": TEXT | st.none(),
        "envProcess": st.sampled_from(["sh -c 'id'", "", "'", "a\x00b"]) | st.none(),
        "envVars": ENV_VARS | st.none() | st.integers(),
        "labels": LABELS | st.none(),
        "annotations": st.dictionaries(st.just(ANNOTATION_READY_PATH) | TEXT, READY_PATHS, max_size=2),
        "constraints": st.lists(TEXT, max_size=2) | st.none(),
        "secrets": st.lists(TEXT, max_size=2),
        "limits": RESOURCES,
        "requests": RESOURCES,
        "readOnlyRootFilesystem": st.booleans() | TEXT,
        "extra": TEXT,
    },
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=10,
)
SCALE = st.fixed_dictionaries(
    {}, optional={"serviceName": NAMES, "replicas": st.integers(-3, 3) | TEXT | st.floats(), "namespace": TEXT}
)
DELETE = st.fixed_dictionaries({}, optional={"functionName": NAMES})
JSON_BODIES = (DEPLOYMENT | SCALE | DELETE | JSON_VALUES).map(lambda value: json.dumps(value).encode())
BODIES = JSON_BODIES | st.binary(max_size=64) | st.sampled_from([b"", b"{", b"[1, 2]", b"\xff\xfe", b"{}" * 3])
CONTENT_TYPES = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "text/plain", "", "a/b"]
)
HOSTS = st.sampled_from([None, "localhost", "127.0.0.1:1", "evil.example", "[::1]", "[::1", "a@b"])
SYSTEM_PATHS = st.one_of(
    st.sampled_from(["/system/functions", "/system/info", "/system/", "/system/nope"]),
    NAMES.map(lambda name: f"/system/function/{quote(name, safe='')}"),
    NAMES.map(lambda name: f"/system/scale-function/{quote(name, safe='')}"),
)
HEADER_NAMES = st.sampled_from(["X-Call-Id", "X-Forwarded-For", "Accept", "Origin", "Cookie", "X-Any", "Range"])
# Header values as HTTP allows them (no surrounding whitespace): what reaches the gateway at all.
HEADER_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24).map(str.strip)
HEADERS = st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=3)


def request_headers(content_type: str, host: str | None, extra: dict[str, str]) -> dict[str, str]:
    headers = dict(extra)
    if content_type:
        headers["Content-Type"] = content_type
    if host is not None:
        headers["Host"] = host
    return headers


def as_json(strategy: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    return strategy.map(lambda value: json.dumps(value).encode())


def named(template: str) -> st.SearchStrategy[str]:
    return (st.sampled_from(FUZZ_NAMES) | NAMES).map(lambda name: template.format(quote(name, safe="")))


# Requests as a client would send them, with fuzzed documents: they reach the registry, the pools, the replicas.
WELL_FORMED = st.one_of(
    st.tuples(st.sampled_from(["POST", "PUT"]), st.just("/system/functions"), as_json(DEPLOYMENT)),
    st.tuples(st.just("DELETE"), st.just("/system/functions"), as_json(DELETE)),
    st.tuples(st.just("POST"), named("/system/scale-function/{}"), as_json(SCALE)),
    st.tuples(
        st.just("POST"),
        named("/system/scale-function/{}"),
        as_json(st.fixed_dictionaries({"serviceName": st.sampled_from(FUZZ_NAMES), "replicas": st.integers(0, 2)})),
    ),
    st.tuples(
        st.just("GET"),
        named("/system/function/{}") | st.sampled_from(["/system/functions", "/system/info"]),
        st.just(b""),
    ),  # fmt: skip
).map(lambda request: (*request, "application/json", None, {}))
# Anything at all.
ANY_REQUEST = st.tuples(st.sampled_from(METHODS), SYSTEM_PATHS, BODIES, CONTENT_TYPES, HOSTS, HEADERS)


# --- properties ------------------------------------------------------------------------------------


@FUZZ
@given(WELL_FORMED | WELL_FORMED | ANY_REQUEST)
def test_system_api_answers_every_request_without_a_5xx(http: httpx.Client, request: tuple) -> None:
    method, path, body, content_type, host, extra = request
    response = http.request(method, path, content=body, headers=request_headers(content_type, host, extra))
    assert response.status_code < 500, (method, path, body, response.status_code, response.text)


@FUZZ
@given(
    st.sampled_from(METHODS),
    st.sampled_from([STEADY, *FUZZ_NAMES]) | NAMES,
    st.text(max_size=16),
    st.dictionaries(TEXT, TEXT, max_size=2),
    st.binary(max_size=256),
    HEADERS,
)
def test_function_routes_answer_every_request(
    http: httpx.Client, method: str, name: str, path: str, query: dict, body: bytes, extra: dict
) -> None:
    url = f"/function/{quote(name, safe='')}/{quote(path, safe='/')}"
    response = http.request(method, url, params=query, content=body, headers=extra)
    if name == STEADY:
        # The echo function answers 200 (404 for a GET of a path it does not know); its gateway never fails it.
        assert response.status_code in (200, 404), (method, url, response.status_code, response.text)
        if method not in ("GET", "HEAD"):
            assert response.content == body
    else:
        assert response.status_code < 500 or response.status_code in FUNCTION_FAILURES, (url, response.text)


def test_the_gateway_is_healthy_and_leaves_no_process_after_the_fuzz(
    http: httpx.Client, gateway: GatewayProcess
) -> None:
    assert http.get("/healthz").status_code == 200
    assert http.post(f"/function/{STEADY}", content=b"still serving").content == b"still serving"
    deployed = [f["name"] for f in http.get("/system/functions").json()]
    for name in deployed:
        if name != STEADY:
            deleted = http.request("DELETE", "/system/functions", json={"functionName": name})
            assert deleted.status_code == 200, deleted.text
    assert [f["name"] for f in http.get("/system/functions").json()] == [STEADY]
    wait_until(lambda: len(live(gateway.function_processes())) == 1, "only the steady function's replica is left")
    (steady,) = live(gateway.function_processes())
    assert steady.environ().get("TEST_FUNCTION") == STEADY


def live(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive
