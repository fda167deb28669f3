"""The function tier failing, seen through `faasmoe serve` over real HTTP.

With the gateway gone, each request gets a 503 OpenAI error object naming the function (no internal
URL, no log path; a request id that the server log has the detail under), streams end with an error
event, the keep-alive connection stays, and no quota slot is kept. A gateway back without the function
gives 503 too (not deployed yet: a later try may succeed); once it is deployed, a tenant limited to one
request at a time, which had more failures than that, is served exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import yaml

from faasmoe.gateway.embedded import GatewayProcess
from faasmoe.planning.export import export
from faasmoe.server.middleware import REQUEST_ID_HEADER
from faasmoe.server.process import ServeProcess
from tests.conftest import TEST_THREADS
from tests.reference import load_reference, reference_greedy
from tests.test_remote_e2e import deploy

MODEL = "tiny-fp32"
ALPHA, LIMITED = "sk-alpha-0001", "sk-limited-0002"
TENANTS = {"tenants": [{"name": "alpha", "api_keys": [ALPHA]},
                       {"name": "limited", "api_keys": [LIMITED], "max_concurrent": 1}]}  # fmt: skip
PROMPT = [5, 9, 120, 33]
NEW_TOKENS = 6


def body(**extra) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **extra}  # fmt: skip


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def local_port(response: httpx.Response) -> int:
    """The client's port of the connection a response came on: equal ports, one kept-alive connection."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_the_gateway_down_is_a_503_per_request_that_keeps_no_quota_slot(tiny_fp32: Path, tmp_path: Path):
    plan = export(tiny_fp32, tmp_path / "plan", experts_per_function=12, layers_per_function=2)  # one function
    (tmp_path / "tenants.yaml").write_text(yaml.safe_dump(TENANTS))
    greedy = reference_greedy(load_reference(tiny_fp32), [PROMPT], NEW_TOKENS)[0]
    with GatewayProcess(log_path=tmp_path / "gateway.log") as gateway:
        deploy(gateway, tmp_path / "plan")
        args = ["--model", str(tiny_fp32), "--plan", str(tmp_path / "plan"), "--gateway", gateway.url,
                "--tenants", str(tmp_path / "tenants.yaml"), "--threads", str(TEST_THREADS)]  # fmt: skip
        with ServeProcess(args=args, log_path=tmp_path / "serve.log") as server:
            client = httpx.Client(base_url=server.url, timeout=60, trust_env=False)
            warm = client.post("/v1/completions", json=body(), headers=auth(LIMITED))
            assert warm.json()["choices"][0]["token_ids"] == greedy
            gateway.stop()

            failed = client.post("/v1/completions", json=body(), headers=auth(ALPHA))
            assert failed.status_code == 503 and "Retry-After" in failed.headers
            error = failed.json()["error"]
            assert error["type"] == "server_error" and error["code"] == "function_unavailable"
            assert repr(plan.functions[0].name) in error["message"]
            assert failed.headers[REQUEST_ID_HEADER] in error["message"]
            for internal in (gateway.url, f":{gateway.port}", str(tmp_path)):
                assert internal not in failed.text
            after = client.get("/v1/models", headers=auth(ALPHA))
            assert after.status_code == 200 and local_port(after) == local_port(failed)

            with client.stream("POST", "/v1/completions", json=body(stream=True), headers=auth(ALPHA)) as stream:
                events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "function_unavailable"

            limited = [client.post("/v1/completions", json=body(), headers=auth(LIMITED)) for _ in range(3)]
            assert [r.status_code for r in limited] == [503] * 3  # not 429: no slot was kept

            off = client.get("/metrics")  # this server has no metrics key
            assert off.status_code == 403 and "--metrics-key" in off.json()["error"]["message"]

            with GatewayProcess(port=gateway.port, log_path=tmp_path / "gateway-2.log") as again:
                missing = client.post("/v1/completions", json=body(), headers=auth(ALPHA))  # nothing deployed yet
                assert missing.status_code == 503 and missing.json()["error"]["code"] == "function_unavailable"
                assert repr(plan.functions[0].name) in missing.text and again.url not in missing.text
                deploy(again, tmp_path / "plan")
                served = client.post("/v1/completions", json=body(), headers=auth(LIMITED))
                assert served.status_code == 200, served.text
                assert served.json()["choices"][0]["token_ids"] == greedy
            client.close()
