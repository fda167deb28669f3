"""`faasmoe up`: the one-command platform starts, serves a tenant, keeps the gateway's /system API behind
generated credentials only the control plane knows, and Ctrl-C or SIGTERM stops every process it started."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from faasmoe.gateway.embedded import is_gateway
from faasmoe.planning.plan import Plan
from faasmoe.up import GATEWAY_PASSWORD_VARIABLE, GATEWAY_URL_FILE, GATEWAY_USER, METRICS_KEY_FILE, UpProcess
from tests.test_shutdown import EXIT_S, assert_all_gone


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_up_serves_with_gateway_credentials_and_a_signal_stops_everything(tiny_fp32: Path, tmp_path: Path, signum):
    args = ["--model", str(tiny_fp32), "--workdir", str(tmp_path), "--experts-per-function", "6",
            "--idle-timeout", "30s"]  # fmt: skip
    with UpProcess(args=args, log_path=tmp_path / "up.log") as up:
        tenants = yaml.safe_load((tmp_path / "tenants.yaml").read_text())["tenants"]
        assert [t["name"] for t in tenants] == ["alpha", "beta", "gamma"]
        key = tenants[1]["api_keys"][0]
        body = {"model": tiny_fp32.name, "prompt": [5, 9, 120], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{up.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                              timeout=120, trust_env=False)  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
        printed = up.log_path.read_text()
        assert f"{up.url}/v1" in printed and key in printed
        metrics_key = (tmp_path / METRICS_KEY_FILE).read_text().strip()
        assert (tmp_path / METRICS_KEY_FILE).stat().st_mode & 0o077 == 0, "the metrics key is its user's alone"
        for bearer, status in [(key, 403), (metrics_key, 200)]:
            metrics = httpx.get(f"{up.url}/metrics", headers={"Authorization": f"Bearer {bearer}"}, trust_env=False)
            assert metrics.status_code == status, metrics.text

        tree = [psutil.Process(up.pid), *up.descendants()]
        assert any("faasmoe.function" in " ".join(p.cmdline()) for p in tree), "functions were started"
        (gateway,) = [p for p in tree if is_gateway(p)]
        password = gateway.environ()[GATEWAY_PASSWORD_VARIABLE]
        assert len(password) >= 32
        assert not any(password in " ".join(p.cmdline()) for p in tree), "credentials are never on argv"
        assert password not in printed
        gateway_url = (tmp_path / GATEWAY_URL_FILE).read_text().strip()
        assert httpx.get(gateway_url + "/system/functions", trust_env=False).status_code == 401
        listed = httpx.get(gateway_url + "/system/functions", auth=(GATEWAY_USER, password), trust_env=False)
        plan = Plan.load(next((tmp_path / "plans").glob("*/*")))
        assert sorted(f["name"] for f in listed.json()) == sorted(f.name for f in plan.functions), "deployed by up"

        up.process.send_signal(signum)
        assert up.process.wait(EXIT_S) == 0
        assert_all_gone(tree)
