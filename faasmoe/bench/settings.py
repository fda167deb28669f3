"""Typed settings of `faasmoe bench`: the model, the systems compared, the workload and the measurement."""

from __future__ import annotations

import enum
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from faasmoe.bench.distributions import LengthDistribution
from faasmoe.gateway.embedded.config import FunctionSpawn

# AWS Lambda's public on-demand price (x86, us-east-1, first tier), per GB-second of configured memory.
AWS_LAMBDA_PRICE_PER_GB_S = 0.0000166667
DEFAULT_RESULTS_DIR = Path("benchmarks/results")


class SystemKind(str, enum.Enum):
    """The serving systems compared; each runs as real processes started by the benchmark."""

    FULL_PER_TENANT = "full-per-tenant"  # one full-model server per tenant
    FULL_SHARED = "full-shared"  # one full-model server for all tenants
    STATIC_EXPERTS = "static-experts"  # trunk + one always-on function holding every expert
    FAASMOE_SHARED = "faasmoe-shared"  # one trunk for all tenants over scale-to-zero expert functions
    FAASMOE_PRIVATE = "faasmoe-private"  # per-tenant engines over the same scale-to-zero functions

    @property
    def sweeps_granularity(self) -> bool:
        """Whether the system runs once per experts-per-function value of the sweep."""
        return self in (SystemKind.FAASMOE_SHARED, SystemKind.FAASMOE_PRIVATE)


# --quick replaces these values, unless they were given explicitly: a tiny model, 2 tenants, one granularity.
QUICK_OVERRIDES: dict[str, object] = {
    "preset": "tiny",
    "layers": None,
    "tenants": 2,
    "experts_per_function": [6],
    "duration": 5.0,
    "rate": 1.5,
    "burst": 3.0,
    "idle": 3.0,
    "prompt_len": LengthDistribution.parse("uniform:8-16"),
    "output_len": LengthDistribution.parse("uniform:4-8"),
    "drain_timeout": 60.0,
}


class BenchSettings(BaseModel):
    """Everything `faasmoe bench` can be told; each field is the option of the same name (``idle_timeout``:
    ``--idle-timeout``). Durations are seconds, rates requests per second."""

    model_config = ConfigDict(extra="forbid")

    # --- systems --------------------------------------------------------------------------------
    systems: list[SystemKind] = Field(default_factory=lambda: list(SystemKind), min_length=1)
    experts_per_function: list[PositiveInt] = Field(
        default_factory=lambda: [1, 4, 10, 20, 60], min_length=1, description="granularity sweep of faasmoe-*"
    )
    layers_per_function: int = Field(default=1, ge=1, description="consecutive MoE layers per function")
    idle_timeout: float = Field(default=5.0, gt=0, description="function idle time before scale to zero")

    # --- model ----------------------------------------------------------------------------------
    preset: str = Field(default="qwen1.5-bench", description="init-model preset of the random checkpoint")
    layers: int | None = Field(default=2, ge=1, description="depth (None: the preset's)")
    dtype: str = "bfloat16"
    router_skew: float = Field(default=1.0, ge=0, description="Zipf exponent of expert popularity")
    model_dir: Path | None = Field(default=None, description="an existing checkpoint instead of init-model")

    # --- workload -------------------------------------------------------------------------------
    tenants: int = Field(default=6, ge=1)
    duration: float = Field(default=80.0, gt=0, description="length of the generated workload")
    requests: int | None = Field(default=None, ge=1, description="cap on requests per tenant")
    rate: float = Field(default=0.25, gt=0, description="Poisson arrivals per tenant while active")
    burst: float = Field(default=20.0, gt=0, description="active period of each tenant")
    idle: float = Field(default=40.0, ge=0, description="idle gap after each active period (0: none)")
    stagger: float = Field(default=0.0, ge=0, le=1, description="tenants' phase spread, as a fraction of a cycle")
    prompt_len: LengthDistribution = Field(default_factory=lambda: LengthDistribution.parse("lognormal:48,0.5"))
    output_len: LengthDistribution = Field(default_factory=lambda: LengthDistribution.parse("uniform:16-48"))
    seed: int = 0
    trace: Path | None = Field(default=None, description="replay this JSON-lines trace instead")

    # --- measurement ----------------------------------------------------------------------------
    sample_interval: float = Field(default=0.5, gt=0, description="OS memory/CPU sampling period")
    price_per_gb_s: float = Field(default=AWS_LAMBDA_PRICE_PER_GB_S, ge=0)
    threads: int | None = Field(default=None, ge=1, description="torch threads of every server (None: torch's)")
    # Function replicas share the machine's cores with each other and the control plane; None gives each
    # the cores divided among the functions one MoE layer calls at once (at least 1).
    function_threads: int | None = Field(default=None, ge=1, description="torch threads of every function replica")
    function_spawn: FunctionSpawn = Field(
        default="fork", description="replicas forked from the gateway's pre-imported runtime, or exec'd anew"
    )
    startup_timeout: float = Field(default=600.0, gt=0, description="per system, until every server is ready")
    request_timeout: float = Field(default=600.0, gt=0)
    drain_timeout: float = Field(default=300.0, ge=0, description="wait for in-flight requests after the trace")

    # --- output ---------------------------------------------------------------------------------
    out: Path = DEFAULT_RESULTS_DIR
    work_dir: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "faasmoe-bench",
        description="checkpoints, plans and process logs (reused across runs)",
    )
    quick: bool = False
    progress: bool = True

    @field_validator("experts_per_function")
    @classmethod
    def _sorted_granularities(cls, values: list[int]) -> list[int]:
        return sorted(set(values))

    @field_validator("prompt_len", "output_len", mode="before")
    @classmethod
    def _parse_length(cls, value: object) -> object:
        return LengthDistribution.parse(value) if isinstance(value, str) else value

    @field_validator("systems", "experts_per_function", mode="before")
    @classmethod
    def _parse_comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def resolved(self) -> BenchSettings:
        """The settings in effect: --quick's values for every field not given explicitly."""
        if not self.quick:
            return self
        overrides = {k: v for k, v in QUICK_OVERRIDES.items() if k not in self.model_fields_set}
        return self.model_copy(update=overrides)

    @property
    def cycle(self) -> float:
        return self.burst + self.idle
