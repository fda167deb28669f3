"""The expert plan: which function holds which (layer, expert) pairs. Stored as plan.json."""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from faasmoe.errors import PlanError
from faasmoe.model.checkpoint import Checkpoint
from faasmoe.model.families import FAMILIES
from faasmoe.planning.digest import Sha256
from faasmoe.planning.grouping import Grouping, group_experts

if TYPE_CHECKING:  # transformers costs ~1.5 s to import
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
# Version 2 records a sha256 per shard and of the trunk file; version 1 plans have none and still load.
# Version 3 writes shards in the layout the maths reads (faasmoe.experts.shard.FORMAT), mapped at load
# without a copy; a shard says its own format, so the shards of version 1 and 2 plans still load.
PLAN_VERSION = 3
DIGESTS_SINCE = 2
TRUNK_FILE = "trunk.safetensors"
SHARD_DIR = "functions"
DEFAULT_PREFIX = "moe"


class ModelShape(BaseModel):
    """What a plan must agree on with its model; ``model_type`` names its family (faasmoe/model/families.py)."""

    model_config = ConfigDict(frozen=True)

    model_type: str
    num_hidden_layers: int
    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    dtype: str
    moe_layers: list[int]

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> ModelShape:
        return cls.from_config(checkpoint.config, checkpoint.dtype)

    @classmethod
    def from_config(cls, config: PretrainedConfig, dtype: torch.dtype | None = None) -> ModelShape:
        """The shape a config describes; ``dtype`` defaults to the config's (a preset's has none: float32)."""
        c = config
        family = FAMILIES[c.model_type]
        dtype = dtype or c.dtype or torch.float32
        return cls(
            model_type=c.model_type,
            num_hidden_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            moe_intermediate_size=family.intermediate_size(c),
            num_experts=family.num_experts(c),
            num_experts_per_tok=c.num_experts_per_tok,
            dtype=str(dtype).removeprefix("torch."),
            moe_layers=family.moe_layers(c),
        )


class FunctionSpec(BaseModel):
    """One expert-group function: its name (DNS-1123, as OpenFaaS needs) and the experts it holds."""

    name: str
    shard: str  # path of its safetensors file, relative to the plan directory
    layers: list[int]
    experts: list[tuple[int, int]]  # (layer, expert) pairs
    bytes: int = 0
    sha256: Sha256 | None = None  # of the shard file as exported; None in version-1 plans


class Plan(BaseModel):
    version: int = Field(default=PLAN_VERSION, ge=1)
    model: ModelShape
    experts_per_function: int = Field(ge=1)
    layers_per_function: int = Field(ge=1)
    # How experts were grouped (faasmoe/planning/grouping.py); plans written before it are contiguous.
    grouping: Grouping = Grouping.CONTIGUOUS
    trunk: str = TRUNK_FILE
    trunk_sha256: Sha256 | None = None  # of the trunk file; None in version-1 plans
    functions: list[FunctionSpec]

    @classmethod
    def group(
        cls,
        shape: ModelShape,
        experts_per_function: int,
        layers_per_function: int = 1,
        prefix: str = DEFAULT_PREFIX,
        grouping: Grouping = Grouping.CONTIGUOUS,
        popularity: torch.Tensor | None = None,
    ) -> Plan:
        """Groups N experts x M consecutive MoE layers per function; N need not divide the expert count.

        ``popularity`` [MoE layers, E] orders the experts for ``Grouping.POPULARITY`` (grouping.py)."""
        groups = group_experts(
            shape.moe_layers, shape.num_experts, experts_per_function, layers_per_function, grouping, popularity
        )
        functions = [
            FunctionSpec(
                name=f"{prefix}-{group.name}",
                shard=f"{SHARD_DIR}/{prefix}-{group.name}.safetensors",
                layers=group.layers,
                experts=group.experts,
            )
            for group in groups
        ]
        return cls(
            model=shape,
            experts_per_function=experts_per_function,
            layers_per_function=layers_per_function,
            grouping=grouping,
            functions=functions,
        )

    @classmethod
    def load(cls, plan_dir: str | Path) -> Plan:
        path = Path(plan_dir) / PLAN_FILE
        if not path.is_file():
            raise PlanError(f"{plan_dir} is not a plan directory: {PLAN_FILE} is missing")
        try:
            plan = cls.model_validate_json(path.read_text())
        except ValidationError as exc:
            raise PlanError(f"{path} is malformed: {exc}") from exc
        plan._check_format(path)
        return plan

    def save(self, plan_dir: Path) -> None:
        plan_dir.mkdir(parents=True, exist_ok=True)
        (plan_dir / PLAN_FILE).write_text(self.model_dump_json(indent=2) + "\n")

    def _check_format(self, path: Path) -> None:
        """A version this code reads; from version 2 on every file has its digest, version 1 loads unverified."""
        if self.version > PLAN_VERSION:
            raise PlanError(f"{path} is plan version {self.version}; this faasmoe reads versions up to {PLAN_VERSION}")
        if self.version < DIGESTS_SINCE:
            logger.warning(
                "%s is plan version %d: it records no sha256 digests, so its shards and trunk cannot be verified "
                "(re-export it with `faasmoe export` to verify them)",
                path,
                self.version,
            )
            return
        unrecorded = [f.shard for f in self.functions if f.sha256 is None]
        if self.trunk_sha256 is None:
            unrecorded.insert(0, self.trunk)
        if unrecorded:
            raise PlanError(f"{path} (version {self.version}) records no sha256 of {unrecorded[0]}")

    def check_matches(self, checkpoint: Checkpoint) -> None:
        expected = ModelShape.of(checkpoint)
        if self.model != expected:
            diffs = [
                f"{field}: plan {getattr(self.model, field)!r}, model {getattr(expected, field)!r}"
                for field in ModelShape.model_fields
                if getattr(self.model, field) != getattr(expected, field)
            ]
            raise PlanError(f"plan does not match model {checkpoint.path}: " + "; ".join(diffs))

    @cached_property
    def owners(self) -> dict[int, torch.Tensor]:
        """For each MoE layer, a tensor [E] giving the index of the function that holds each expert."""
        table = {layer: torch.full((self.model.num_experts,), -1, dtype=torch.int64) for layer in self.model.moe_layers}
        for index, function in enumerate(self.functions):
            for layer, expert in function.experts:
                table[layer][expert] = index
        for layer, owner in table.items():
            if bool((owner < 0).any()):
                missing = int(torch.nonzero(owner < 0)[0])
                raise PlanError(f"plan gives expert {missing} of layer {layer} to no function")
        return table
