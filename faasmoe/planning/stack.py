"""stack.yml for real OpenFaaS, and the gateway-API deployment of each function, from one plan.

Every function of a plan runs the same image (functions/expert-group); its environment names the
shard to load and the sha256 the plan recorded of it. Memory is sized from the shard: weights x headroom
+ a base for python and torch.
`deployment_for` gives the same data as OpenFaaS's FunctionDeployment JSON (POST /system/functions),
so `faasmoe stack` and `faasmoe deploy` cannot disagree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, Field

from faasmoe.gateway.durations import PositiveDuration

# The OpenFaaS labels, spelled once for stack.yml, `faasmoe deploy` and the embedded gateway. Pro/Edge
# understand scale.zero*; Community Edition ignores them and caps replicas at 5 (docs/openfaas.md).
from faasmoe.gateway.schemas import (
    ANNOTATION_READY_PATH,
    LABEL_SCALE_MAX,
    LABEL_SCALE_MIN,
    LABEL_SCALE_ZERO,
    LABEL_SCALE_ZERO_DURATION,
)
from faasmoe.model.presets import preset_config
from faasmoe.planning.grouping import Grouping
from faasmoe.planning.plan import FunctionSpec, ModelShape, Plan

STACK_VERSION = 1.0
DEFAULT_GATEWAY = "${OPENFAAS_URL:-http://127.0.0.1:8080}"  # faas-cli substitutes ${VAR:-default}
DEFAULT_IMAGE = "ghcr.io/faasmoe/expert-group:0.1.0"
DEFAULT_WEIGHTS_URI = "/var/faasmoe/plan"
HANDLER = "./functions/expert-group"
LANG = "dockerfile"
# faas-cli builds a `lang: dockerfile` function in a copy of its handler folder; these repository paths
# are copied in too, so the Dockerfile sees the same files as with the repository root as context.
BUILD_COPY = ["./faasmoe", "./pyproject.toml", "./functions/expert-group/requirements.txt"]
# Exactness needs the control plane's intra-op thread count (2 on the reference 2-core machine).
DEFAULT_THREADS = 2

MIB = 1 << 20
# A loaded function without weights (python, torch, uvicorn) is about 250 MB resident; the rest is slack.
BASE_MEMORY_MIB = 384
# Above the weights themselves: the transient [gate; up] concatenation while loading, allocator
# fragmentation and request buffers. Page cache of the shard file is reclaimable and not counted.
MEMORY_HEADROOM = 1.25

READY_PATH = "/ready"
# faasmoe's own labels: Kubernetes label values allow [A-Za-z0-9._-], so spans are written "0-19".
LABEL_LAYERS = "faasmoe.layers"
LABEL_EXPERTS = "faasmoe.experts"
LABEL_EXPERT_COUNT = "faasmoe.expert-count"


class StackSettings(BaseModel):
    """What `faasmoe stack` (and `faasmoe deploy`) can be told; defaults suit the published image."""

    image: str = DEFAULT_IMAGE
    gateway: str = DEFAULT_GATEWAY
    weights_uri: str = Field(default=DEFAULT_WEIGHTS_URI, description="the plan directory as functions see it")
    threads: int | None = Field(default=DEFAULT_THREADS, ge=1, description="FAASMOE_THREADS; None: torch default")
    scale_min: int = Field(default=0, ge=0)
    scale_max: int = Field(default=5, ge=1)
    scale_zero: bool = True
    zero_duration: PositiveDuration = "5m"
    base_memory_mib: int = Field(default=BASE_MEMORY_MIB, ge=0)
    memory_headroom: float = Field(default=MEMORY_HEADROOM, ge=1.0)
    cpu_limit: str | None = Field(default=None, description='e.g. "2"; None leaves CPU unlimited')
    # Every function runs one image: build (and push) it with the first function only.
    build_once: bool = True


def memory_bytes(weights_bytes: int, settings: StackSettings) -> int:
    """What a replica holding ``weights_bytes`` of experts uses: its memory request before rounding to a MiB."""
    return weights_bytes + settings.base_memory_mib * MIB


def memory_mib(weights_bytes: int, settings: StackSettings) -> tuple[int, int]:
    """(request, limit) in MiB for a function holding ``weights_bytes`` of experts."""
    request = math.ceil(memory_bytes(weights_bytes, settings) / MIB)
    limit = math.ceil(weights_bytes / MIB * settings.memory_headroom + settings.base_memory_mib)
    return request, limit


def function_environment(function: FunctionSpec, settings: StackSettings) -> dict[str, str]:
    """faasmoe.function's FunctionSettings as FAASMOE_* variables; the digest only where the plan records one."""
    env = {"FAASMOE_FUNCTION": function.name, "FAASMOE_WEIGHTS_URI": settings.weights_uri}
    if function.sha256 is not None:
        env["FAASMOE_SHARD_SHA256"] = function.sha256
    if settings.threads is not None:
        env["FAASMOE_THREADS"] = str(settings.threads)
    return env


def function_labels(function: FunctionSpec, settings: StackSettings) -> dict[str, str]:
    """Label values are strings (OpenFaaS and Kubernetes reject numbers and booleans)."""
    labels = {
        LABEL_SCALE_MIN: str(settings.scale_min),
        LABEL_SCALE_MAX: str(settings.scale_max),
        LABEL_SCALE_ZERO: "true" if settings.scale_zero else "false",
        LABEL_SCALE_ZERO_DURATION: settings.zero_duration,
        LABEL_LAYERS: _span(function.layers),
        LABEL_EXPERT_COUNT: str(len(function.experts)),
    }
    experts = sorted({expert for _, expert in function.experts})
    # The same contiguous block at every layer, as the contiguous grouping makes; a popularity plan's
    # experts are listed in plan.json only (a label value holds 63 characters).
    same_block = len(function.experts) == len(experts) * len(function.layers)
    if same_block and experts == list(range(experts[0], experts[-1] + 1)):
        labels[LABEL_EXPERTS] = _span(experts)
    return labels


def function_annotations() -> dict[str, str]:
    return {ANNOTATION_READY_PATH: READY_PATH}


def deployment_for(function: FunctionSpec, settings: StackSettings) -> dict[str, Any]:
    """The function as OpenFaaS's FunctionDeployment JSON (service, image, envVars, labels, ...)."""
    request, limit = memory_mib(function.bytes, settings)
    limits = {"memory": f"{limit}Mi"}
    if settings.cpu_limit is not None:
        limits["cpu"] = settings.cpu_limit
    return {
        "service": function.name,
        "image": settings.image,
        "envVars": function_environment(function, settings),
        "labels": function_labels(function, settings),
        "annotations": function_annotations(),
        "limits": limits,
        "requests": {"memory": f"{request}Mi"},
    }


def stack_function(function: FunctionSpec, settings: StackSettings, build: bool = True) -> dict[str, Any]:
    """One stack.yml function entry, from the same fields as its deployment."""
    deployment = deployment_for(function, settings)
    entry: dict[str, Any] = {"lang": LANG, "handler": HANDLER, "image": deployment["image"]}
    if not build:
        entry["skip_build"] = True  # faas-cli build and push skip it; the image is the first function's
    entry |= {
        "environment": deployment["envVars"],
        "labels": deployment["labels"],
        "annotations": deployment["annotations"],
        "limits": deployment["limits"],
        "requests": deployment["requests"],
    }
    return entry


def stack_document(plan: Plan, settings: StackSettings) -> dict[str, Any]:
    functions = {
        f.name: stack_function(f, settings, build=not settings.build_once or index == 0)
        for index, f in enumerate(plan.functions)
    }
    return {
        "version": STACK_VERSION,
        "provider": {"name": "openfaas", "gateway": settings.gateway},
        "functions": functions,
        "configuration": {"copy": list(BUILD_COPY)},
    }


def write_stack(plan: Plan, out: Path, settings: StackSettings | None = None) -> Path:
    """Writes stack.yml for every function of ``plan``; returns ``out``."""
    settings = settings or StackSettings()
    header = (
        f"# Generated by faasmoe from a plan of {len(plan.functions)} functions "
        f"({plan.experts_per_function} experts x {plan.layers_per_function} layer(s) each).\n"
        "# Build the image once and deploy: faas-cli up -f stack.yml (see docs/openfaas.md).\n"
    )
    text = yaml.dump(_quote_strings(stack_document(plan, settings)), Dumper=_StackDumper, sort_keys=False, width=120)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + text)
    return out


def expert_bytes(shape: ModelShape) -> int:
    """Bytes of one routed expert: gate, up [I, H] and down [H, I] in the model dtype."""
    return 3 * shape.moe_intermediate_size * shape.hidden_size * getattr(torch, shape.dtype).itemsize


def qwen15_shape() -> ModelShape:
    """Qwen1.5-MoE-A2.7B's shape in bf16, without any weights (every one of its 24 layers is MoE)."""
    return ModelShape.from_config(preset_config("qwen1.5-moe-a2.7b"), torch.bfloat16)


def sized_plan(
    shape: ModelShape,
    experts_per_function: int,
    layers_per_function: int = 1,
    grouping: Grouping = Grouping.CONTIGUOUS,
    popularity: torch.Tensor | None = None,
) -> Plan:
    """A plan with each function's bytes filled in from the shape (what `faasmoe export` would write)."""
    plan = Plan.group(shape, experts_per_function, layers_per_function, grouping=grouping, popularity=popularity)
    for function in plan.functions:
        function.bytes = len(function.experts) * expert_bytes(shape)
    return plan


def default_qwen_stack(out: Path = Path("stack.yml"), settings: StackSettings | None = None) -> Plan:
    """The repository's stack.yml: Qwen1.5-MoE-A2.7B, 20 experts x 1 layer per function (72 functions)."""
    plan = sized_plan(qwen15_shape(), experts_per_function=20, layers_per_function=1)
    write_stack(plan, out, settings)
    return plan


def _span(values: list[int]) -> str:
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}-{values[-1]}"


class _Quoted(str):
    """A string written in double quotes (label values, env values: never read as numbers or booleans)."""


class _StackDumper(yaml.SafeDumper):
    pass


_StackDumper.add_representer(
    _Quoted, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", str(value), style='"')
)

_QUOTED_SECTIONS = ("environment", "labels", "annotations")


def _quote_strings(document: dict[str, Any]) -> dict[str, Any]:
    for entry in document["functions"].values():
        for section in _QUOTED_SECTIONS:
            entry[section] = {key: _Quoted(value) for key, value in entry[section].items()}
    return document


if __name__ == "__main__":  # python -m faasmoe.planning.stack [OUT]: regenerate the repository's stack.yml
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("stack.yml")
    generated = default_qwen_stack(target)
    print(f"wrote {target}: {len(generated.functions)} functions")
