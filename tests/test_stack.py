"""stack.yml generation: valid OpenFaaS stack files derived from a plan, and the checked-in stack.yml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from faasmoe.function.settings import FunctionSettings
from faasmoe.gateway.schemas import FunctionDeployment
from faasmoe.planning.plan import ModelShape, Plan
from faasmoe.planning.stack import (
    DEFAULT_GATEWAY,
    DEFAULT_IMAGE,
    DEFAULT_WEIGHTS_URI,
    StackSettings,
    deployment_for,
    expert_bytes,
    qwen15_shape,
    sized_plan,
    write_stack,
)

REPO_STACK = Path(__file__).resolve().parents[1] / "stack.yml"
QWEN_EXPERT_BYTES = 17_301_504  # 3 x 1408 x 2048 x 2 (bf16)

# 12 experts in groups of 5: functions of 5, 5 and 2 experts per layer, so shard sizes differ.
SMALL = ModelShape(
    model_type="qwen2_moe",
    num_hidden_layers=2,
    hidden_size=64,
    moe_intermediate_size=32,
    num_experts=12,
    num_experts_per_tok=4,
    dtype="bfloat16",
    moe_layers=[0, 1],
)


@pytest.fixture
def plan() -> Plan:
    return sized_plan(SMALL, experts_per_function=5)


def load_stack(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def mebibytes(quantity: str) -> int:
    assert quantity.endswith("Mi"), quantity
    return int(quantity.removesuffix("Mi"))


def test_stack_has_one_function_per_plan_entry(plan: Plan, tmp_path: Path) -> None:
    stack = load_stack(write_stack(plan, tmp_path / "stack.yml"))
    assert stack["version"] == 1.0
    assert stack["provider"] == {"name": "openfaas", "gateway": DEFAULT_GATEWAY}
    assert list(stack["functions"]) == [f.name for f in plan.functions]
    for spec in plan.functions:
        entry = stack["functions"][spec.name]
        assert entry["lang"] == "dockerfile"
        assert entry["handler"] == "./functions/expert-group"
        assert entry["image"] == DEFAULT_IMAGE
        assert entry["environment"]["FAASMOE_FUNCTION"] == spec.name
        assert entry["environment"]["FAASMOE_WEIGHTS_URI"] == DEFAULT_WEIGHTS_URI
        assert entry["annotations"] == {"com.openfaas.ready.http.path": "/ready"}
    # faas-cli builds (and pushes) the shared image once, with the first function.
    assert [entry.get("skip_build", False) for entry in stack["functions"].values()] == [False] + [True] * 5
    assert "./faasmoe" in stack["configuration"]["copy"]


def test_labels_env_and_annotations_are_strings(plan: Plan, tmp_path: Path) -> None:
    stack = load_stack(write_stack(plan, tmp_path / "stack.yml"))
    for entry in stack["functions"].values():
        for section in ("labels", "annotations", "environment"):
            assert all(isinstance(v, str) for v in entry[section].values()), (section, entry[section])
        labels = entry["labels"]
        assert labels["com.openfaas.scale.min"] == "0"
        assert labels["com.openfaas.scale.zero"] == "true"
        assert labels["com.openfaas.scale.zero-duration"] == "5m"
    first = stack["functions"]["moe-l00-e000-004"]["labels"]
    assert (first["faasmoe.layers"], first["faasmoe.experts"], first["faasmoe.expert-count"]) == ("0", "0-4", "5")


def test_memory_grows_with_shard_size(tmp_path: Path) -> None:
    uneven = sized_plan(qwen15_shape(), experts_per_function=25)  # blocks of 25, 25 and 10 experts
    stack = load_stack(write_stack(uneven, tmp_path / "stack.yml"))
    big, small = stack["functions"]["moe-l00-e000-024"], stack["functions"]["moe-l00-e050-059"]
    assert mebibytes(small["limits"]["memory"]) < mebibytes(big["limits"]["memory"])
    for entry in (big, small):
        assert mebibytes(entry["requests"]["memory"]) <= mebibytes(entry["limits"]["memory"])
    qwen = {f.name: f for f in sized_plan(qwen15_shape(), 20).functions}["moe-l00-e000-019"]
    settings = StackSettings()
    twenty = deployment_for(qwen, settings)
    assert qwen.bytes == 20 * QWEN_EXPERT_BYTES
    # 330 MiB of experts: request = weights + base, limit = weights x headroom + base.
    assert mebibytes(twenty["requests"]["memory"]) == 330 + settings.base_memory_mib
    assert mebibytes(twenty["limits"]["memory"]) == 413 + settings.base_memory_mib


def test_settings_override_image_gateway_weights_and_threads(plan: Plan, tmp_path: Path) -> None:
    settings = StackSettings(
        image="registry.local/eg:dev",
        gateway="http://gw:8080",
        weights_uri="http://weights/plan",
        threads=None,
        scale_min=1,
        build_once=False,
    )
    stack = load_stack(write_stack(plan, tmp_path / "stack.yml", settings))
    assert stack["provider"]["gateway"] == "http://gw:8080"
    for entry in stack["functions"].values():
        assert entry["image"] == "registry.local/eg:dev"
        assert entry["environment"]["FAASMOE_WEIGHTS_URI"] == "http://weights/plan"
        assert "FAASMOE_THREADS" not in entry["environment"]
        assert "FAASMOE_SHARD_SHA256" not in entry["environment"]  # a sized plan records no digests
        assert entry["labels"]["com.openfaas.scale.min"] == "1"
        assert "skip_build" not in entry


def test_deployment_is_a_valid_function_deployment(plan: Plan) -> None:
    deployment = deployment_for(plan.functions[0], StackSettings(cpu_limit="2"))
    parsed = FunctionDeployment.model_validate(deployment)
    assert parsed.to_wire() == deployment
    assert deployment["envVars"]["FAASMOE_FUNCTION"] == plan.functions[0].name
    assert deployment["limits"]["cpu"] == "2"


def test_stack_and_deploy_give_each_function_its_shard_digest(
    plan: Plan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for index, function in enumerate(plan.functions):
        function.sha256 = f"{index:064x}"  # what `faasmoe export` records
    stack = load_stack(write_stack(plan, tmp_path / "stack.yml"))
    for function in plan.functions:
        environment = stack["functions"][function.name]["environment"]
        assert environment == deployment_for(function, StackSettings())["envVars"]
        assert environment["FAASMOE_SHARD_SHA256"] == function.sha256
        # The function reads exactly these variables as its settings.
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        settings = FunctionSettings()
        assert (settings.function, settings.shard_sha256) == (function.name, function.sha256)


def test_qwen_expert_bytes() -> None:
    assert expert_bytes(qwen15_shape()) == QWEN_EXPERT_BYTES


def test_checked_in_stack_matches_the_default_qwen_plan(tmp_path: Path) -> None:
    plan = sized_plan(qwen15_shape(), experts_per_function=20, layers_per_function=1)
    assert len(plan.functions) == 72
    stack = load_stack(REPO_STACK)
    assert list(stack["functions"]) == [f.name for f in plan.functions]
    for spec in plan.functions:
        assert stack["functions"][spec.name]["environment"]["FAASMOE_FUNCTION"] == spec.name
    regenerated = write_stack(plan, tmp_path / "stack.yml")
    assert REPO_STACK.read_text() == regenerated.read_text(), (
        "stack.yml is stale: regenerate it with `python -m faasmoe.planning.stack stack.yml`"
    )
