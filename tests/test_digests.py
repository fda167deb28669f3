"""Plans record a sha256 of every weight file; a corrupt shard or trunk fails its load, naming the file.

Issue 14 item 6: with flipped bytes in a shard's tensor data (header intact) the weights loaded and
served wrong tokens. Here the same damage makes the in-process load, `SplitModel.load` and `faasmoe serve`
fail with an error that names the file and both digests. (The function process: tests/test_function.py.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from faasmoe.dispatch.executor import open_executor
from faasmoe.errors import PlanError, ShardError
from faasmoe.experts.shard import load_shard
from faasmoe.function.settings import FunctionSettings
from faasmoe.model.generate import generate
from faasmoe.model.sampling import SamplingParams
from faasmoe.model.split_model import SplitModel
from faasmoe.planning.export import export
from faasmoe.planning.plan import PLAN_FILE, PLAN_VERSION, Plan
from tests.corruption import flip_tensor_bytes
from tests.reference import load_reference, reference_greedy

PROMPT = [5, 17, 200, 3, 9]


@pytest.fixture
def exported(tiny_fp32: Path, tmp_path: Path) -> tuple[Plan, Path]:
    plan_dir = tmp_path / "plan"
    return export(tiny_fp32, plan_dir, experts_per_function=5), plan_dir


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corruption_message(what: str, path: Path, recorded: str) -> str:
    """The pattern of the error naming ``path``, its actual digest and the recorded one (prefixes)."""
    actual = sha256_of(path)
    return rf"{what} \S*{path.name} is corrupt: its sha256 is {actual[:12]}\.\.\., the plan recorded {recorded[:12]}"


def rewrite_plan(plan_dir: Path, change) -> None:
    document = json.loads((plan_dir / PLAN_FILE).read_text())
    change(document)
    (plan_dir / PLAN_FILE).write_text(json.dumps(document))


def test_export_records_the_sha256_of_every_file_written(exported) -> None:
    plan, plan_dir = exported
    saved = json.loads((plan_dir / PLAN_FILE).read_text())
    assert saved["version"] == plan.version == PLAN_VERSION == 3
    assert saved["trunk_sha256"] == sha256_of(plan_dir / plan.trunk)
    assert [f["sha256"] for f in saved["functions"]] == [sha256_of(plan_dir / f.shard) for f in plan.functions]
    assert len({f.sha256 for f in plan.functions}) == len(plan.functions)
    assert Plan.load(plan_dir) == plan


def test_flipped_shard_bytes_fail_the_in_process_load_naming_the_shard(tiny_fp32: Path, exported) -> None:
    plan, plan_dir = exported
    victim = plan.functions[1]
    shard = plan_dir / victim.shard
    flip_tensor_bytes(shard)
    load_shard(shard)  # the problem: the header is intact, so without the digest the shard loads
    with pytest.raises(ShardError, match=corruption_message("shard", shard, victim.sha256)) as raised:
        load_shard(shard, victim.sha256)
    assert victim.name in str(raised.value)
    with pytest.raises(ShardError, match=corruption_message("shard", shard, victim.sha256)):
        SplitModel.load(tiny_fp32, plan_dir, open_executor)


def test_flipped_trunk_bytes_fail_the_split_model_load_naming_the_trunk(tiny_fp32: Path, exported) -> None:
    plan, plan_dir = exported
    trunk = plan_dir / plan.trunk
    flip_tensor_bytes(trunk)
    with pytest.raises(ShardError, match=corruption_message("trunk file", trunk, plan.trunk_sha256)):
        SplitModel.load(tiny_fp32, plan_dir, open_executor)


def test_version_1_plan_loads_unverified_with_a_warning(tiny_fp32: Path, exported, caplog) -> None:
    _plan, plan_dir = exported

    def version_1(document: dict) -> None:
        document["version"] = 1
        del document["trunk_sha256"]
        for function in document["functions"]:
            del function["sha256"]

    rewrite_plan(plan_dir, version_1)
    with caplog.at_level(logging.WARNING, logger="faasmoe.planning.plan"):
        split = SplitModel.load(tiny_fp32, plan_dir, open_executor)
    assert "records no sha256 digests, so its shards and trunk cannot be verified" in caplog.text
    assert split.plan.version == 1 and split.plan.trunk_sha256 is None
    assert all(f.sha256 is None for f in split.plan.functions)
    expected = reference_greedy(load_reference(tiny_fp32), [PROMPT], 6)
    assert generate(split.trunk, [PROMPT], SamplingParams(max_new_tokens=6)) == expected


def test_plan_without_a_digest_or_from_a_newer_faasmoe_is_refused(exported) -> None:
    plan, plan_dir = exported
    rewrite_plan(plan_dir, lambda document: document["functions"][2].pop("sha256"))
    with pytest.raises(PlanError, match=f"version 3\\) records no sha256 of {plan.functions[2].shard}"):
        Plan.load(plan_dir)
    rewrite_plan(plan_dir, lambda document: document.update(version=4))
    with pytest.raises(PlanError, match="plan version 4; this faasmoe reads versions up to 3"):
        Plan.load(plan_dir)
    rewrite_plan(plan_dir, lambda document: document.update(version=3, trunk_sha256="not-hex"))
    with pytest.raises(PlanError, match="trunk_sha256"):
        Plan.load(plan_dir)


def test_function_settings_validate_the_digest() -> None:
    digest = "AB" * 32
    settings = FunctionSettings(function="f", weights_uri="/plan", shard_sha256=digest)
    assert settings.shard_sha256 == digest.lower()
    with pytest.raises(ValidationError, match="shard_sha256"):
        FunctionSettings(function="f", weights_uri="/plan", shard_sha256="ab" * 31)


def test_serve_refuses_to_start_on_a_corrupt_trunk(tiny_fp32: Path, exported, tmp_path: Path) -> None:
    plan, plan_dir = exported
    trunk = plan_dir / plan.trunk
    flip_tensor_bytes(trunk)
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(yaml.safe_dump({"tenants": [{"name": "alpha", "api_keys": ["sk-alpha-0001"]}]}))
    args = ["serve", "--model", tiny_fp32, "--plan", plan_dir, "--tenants", tenants, "--port", "0"]
    result = subprocess.run(
        [sys.executable, "-m", "faasmoe.cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert re.search(corruption_message("trunk file", trunk, plan.trunk_sha256), last_line), result.stderr
