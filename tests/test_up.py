"""`faasmoe up`: the one-command platform starts, serves a tenant, and Ctrl-C stops every process it started."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml

from faasmoe.gateway.embedded.ports import free_port

READY_TIMEOUT_S = 180


def test_up_serves_and_ctrl_c_stops_everything(tiny_fp32: Path, tmp_path: Path):
    port = free_port("127.0.0.1")
    command = [sys.executable, "-m", "faasmoe.cli", "up", "--model", str(tiny_fp32), "--port", str(port),
               "--workdir", str(tmp_path), "--experts-per-function", "6", "--idle-timeout", "30s"]  # fmt: skip
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, up, tmp_path / "up.log")
        tenants = yaml.safe_load((tmp_path / "tenants.yaml").read_text())["tenants"]
        assert [t["name"] for t in tenants] == ["alpha", "beta", "gamma"]
        key = tenants[1]["api_keys"][0]
        body = {"model": tiny_fp32.name, "prompt": [5, 9, 120], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                              timeout=120, trust_env=False)  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
        printed = (tmp_path / "up.log").read_text()
        assert f"http://127.0.0.1:{port}/v1" in printed and key in printed
        tree = [psutil.Process(up.pid), *psutil.Process(up.pid).children(recursive=True)]
        assert any("faasmoe.function" in " ".join(p.cmdline()) for p in tree), "functions were started"
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert alive == []
    finally:
        if up.poll() is None:
            up.kill()
        for process in tree:
            if process.is_running():
                process.kill()
        log.close()


def _wait_ready(base: str, up: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert up.poll() is None, f"faasmoe up exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(base + "/ready", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"faasmoe up not ready:\n{log.read_text()[-3000:]}")
