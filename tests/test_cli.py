"""The documented commands, run as a user runs them: init-model, export, generate --json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from faasmoe.cli import app
from tests.reference import load_reference, reference_greedy


def faasmoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "faasmoe.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_init_export_generate(tmp_path):
    model = tmp_path / "model"
    assert faasmoe("init-model", model, "--preset", "tiny", "--dtype", "float32", "--seed", "7").returncode == 0
    exported = faasmoe("export", model, tmp_path / "plan", "--experts-per-function", "5")
    assert exported.returncode == 0, exported.stderr
    assert "3 functions" in exported.stdout or "functions" in exported.stdout

    run = faasmoe(
        "generate",
        "--model",
        model,
        "--plan",
        tmp_path / "plan",
        "--prompt-ids",
        "3,14,15,92,65",
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["token_ids"] == reference_greedy(load_reference(model), [[3, 14, 15, 92, 65]], 12)[0]

    text = faasmoe("generate", "--model", model, "--prompt", "Hello experts", "--max-new-tokens", "4", "--json")
    assert text.returncode == 0, text.stderr
    assert len(json.loads(text.stdout)["token_ids"]) == 4


def test_generate_rejects_bad_input(tmp_path):
    missing = faasmoe("generate", "--model", tmp_path / "nowhere", "--prompt", "hi")
    assert missing.returncode == 2 and "config.json is missing" in missing.stderr
    both = faasmoe("generate", "--model", tmp_path, "--prompt", "hi", "--prompt-ids", "1")
    assert both.returncode == 2 and "exactly one" in both.stderr


@pytest.mark.parametrize(
    "args, says",
    [
        (["init-model", "{tmp}/model", "--preset", "nope"], "error: unknown preset 'nope'"),  # a ValueError of input
        (["stack", "{tmp}/nowhere"], "error: {tmp}/nowhere is not a plan directory"),  # a FaasmoeError
        (["deploy", "{tmp}", "--gateway", "http://127.0.0.1:9", "--basic-auth", "nopassword"], "error: basic auth"),
        (["serve", "--mode", "bogus"], "error: bad settings:\n4 validation errors for ServeSettings"),
        # Refused before anything is built or started, not when the first function is deployed.
        (["up", "--idle-timeout", "soon", "--workdir", "{tmp}/up"], "error: bad settings:\n1 validation error for Up"),
    ],
)
def test_a_users_error_is_one_message_and_exit_code_2(tmp_path, args: list[str], says: str):
    # In-process (the same command group `faasmoe` runs): a subprocess per case would cost seconds of imports.
    done = CliRunner().invoke(app, [arg.format(tmp=tmp_path) for arg in args])
    assert done.exit_code == 2, done.stderr
    assert done.stderr.startswith(says.format(tmp=tmp_path)), done.stderr
    assert done.stdout == ""


def test_deploy_and_generate_through_gateway(tmp_path):
    import os

    from faasmoe.gateway.embedded import GatewayProcess

    model = tmp_path / "model"
    assert faasmoe("init-model", model, "--preset", "tiny", "--dtype", "bfloat16", "--seed", "9").returncode == 0
    assert faasmoe("export", model, tmp_path / "plan", "--experts-per-function", "7").returncode == 0
    with GatewayProcess() as gateway:
        deployed = faasmoe("deploy", tmp_path / "plan", "--gateway", gateway.url, "--threads", "1")
        assert deployed.returncode == 0, deployed.stderr
        assert "deployed 4 functions" in deployed.stdout
        env = dict(os.environ, OMP_NUM_THREADS="1")  # the trunk's thread count matches the functions'
        run = subprocess.run(
            [sys.executable, "-m", "faasmoe.cli", "generate", "--model", str(model), "--plan", str(tmp_path / "plan"),
             "--prompt-ids", "8,6,7,5,3,0,9", "--max-new-tokens", "10", "--gateway", gateway.url, "--json"],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert len(gateway.function_processes()) == 4  # scaled from zero by the invocations
    expected = reference_greedy(load_reference(model), [[8, 6, 7, 5, 3, 0, 9]], 10)[0]
    assert json.loads(run.stdout)["token_ids"] == expected
