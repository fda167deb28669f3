"""Typed settings of `faasmoe bench`: the model, the systems compared, the workload and the measurement."""

from __future__ import annotations

import enum
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_serializer

from faasmoe.bench.distributions import LengthDistribution
from faasmoe.elastic.keep_alive import KeepAliveMode
from faasmoe.elastic.prewarm import PrewarmMode
from faasmoe.gateway.embedded.config import FunctionSpawn
from faasmoe.planning.grouping import Grouping

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


class Elasticity(BaseModel):
    """How faasmoe-shared runs its functions' elasticity: `faasmoe serve --prewarm P --keep-alive K`, written "P+K"."""

    model_config = ConfigDict(frozen=True)

    prewarm: PrewarmMode
    keep_alive: KeepAliveMode

    @classmethod
    def parse(cls, spec: str) -> Elasticity:
        """Reads "PREWARM+KEEP_ALIVE", e.g. "predicted+adaptive"; raises ValueError otherwise."""
        prewarm, _, keep_alive = spec.strip().partition("+")
        try:
            return cls(prewarm=PrewarmMode(prewarm), keep_alive=KeepAliveMode(keep_alive))
        except ValueError:
            prewarms = ", ".join(m.value for m in PrewarmMode)
            keep_alives = ", ".join(m.value for m in KeepAliveMode)
            raise ValueError(
                f"bad elasticity {spec!r}: use PREWARM+KEEP_ALIVE, PREWARM one of {prewarms}, KEEP_ALIVE one of "
                f"{keep_alives} (e.g. predicted+adaptive)"
            ) from None

    @model_serializer
    def _as_spec(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return f"{self.prewarm.value}+{self.keep_alive.value}"


# --quick replaces these values, unless they were given explicitly: a tiny model, 2 tenants, one granularity.
QUICK_OVERRIDES: dict[str, object] = {
    "preset": "tiny",
    "layers": None,
    "tenants": 2,
    "experts_per_function": [6],
    "elasticity": [Elasticity.parse("predicted+adaptive")],
    "wake_repeats": 1,
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
    # One granularity by default: each plan of the 6-layer model is another 7 GB on disk, and each granularity
    # another run per elasticity mode; sweep with e.g. 10,20,60.
    experts_per_function: list[PositiveInt] = Field(
        default_factory=lambda: [20], min_length=1, description="granularity sweep of faasmoe-*"
    )
    layers_per_function: int = Field(default=1, ge=1, description="consecutive MoE layers per function")
    # faasmoe-shared runs once per grouping too; popularity plans are exported from a routing profile recorded
    # by a profiling pass over a trace of the same tenants (faasmoe/bench/profiling.py).
    grouping: list[Grouping] = Field(
        default_factory=lambda: [Grouping.CONTIGUOUS], min_length=1, description="faasmoe-shared's plan groupings"
    )
    # The functions' zero-duration label (the fixed keep-alive, adaptive's upper bound) and the gateway's idle
    # timeout: above a step that waits for 6 layers' cold starts one after another (--prewarm off) and above
    # waking every function at once, or the gateway stops replicas before the forward pass comes back to them.
    idle_timeout: float = Field(default=15.0, gt=0, description="function idle time before scale to zero")
    # faasmoe-shared runs once per mode and granularity; static-experts and faasmoe-private run serve's defaults.
    elasticity: list[Elasticity] = Field(
        default_factory=lambda: [Elasticity.parse(s) for s in ("off+fixed", "predicted+fixed", "predicted+adaptive")],
        min_length=1,
        description="faasmoe-shared's --prewarm+--keep-alive modes",
    )
    # auto: a full model per tenant if they all fit in memory, else one copy serving one tenant's share of the
    # trace, its memory and CPU figures multiplied by the tenants (labelled extrapolated).
    full_per_tenant: Literal["auto", "all", "one"] = "auto"
    wake_repeats: int = Field(default=3, ge=1, description="wakes of every function through the scale API, timed")

    # --- model ----------------------------------------------------------------------------------
    preset: str = Field(default="qwen1.5-bench", description="init-model preset of the random checkpoint")
    layers: int | None = Field(default=6, ge=1, description="depth (None: the preset's)")
    dtype: str = "bfloat16"
    router_skew: float = Field(default=1.0, ge=0, description="Zipf exponent of expert popularity")
    model_dir: Path | None = Field(default=None, description="an existing checkpoint instead of init-model")

    # --- workload -------------------------------------------------------------------------------
    tenants: int = Field(default=6, ge=1)
    # Three bursts with two idle gaps between them, each far longer than the keep-alive: cold starts after idle.
    duration: float = Field(default=150.0, gt=0, description="length of the generated workload")
    requests: int | None = Field(default=None, ge=1, description="cap on requests per tenant")
    rate: float = Field(default=0.1, gt=0, description="Poisson arrivals per tenant while active")
    burst: float = Field(default=20.0, gt=0, description="active period of each tenant")
    idle: float = Field(default=45.0, ge=0, description="idle gap after each active period (0: none)")
    stagger: float = Field(default=0.0, ge=0, le=1, description="tenants' phase spread, as a fraction of a cycle")
    prompt_len: LengthDistribution = Field(default_factory=lambda: LengthDistribution.parse("lognormal:48,0.5"))
    output_len: LengthDistribution = Field(default_factory=lambda: LengthDistribution.parse("uniform:16-32"))
    # Each tenant's prompts come from its own disjoint, seeded set of token ids, so that tenants route to
    # different experts (None: the prompt ids shared out equally; 0: every tenant draws from all of them).
    # Small, because with random weights only a few tokens' own routing preferences add up to a tenant's
    # (benchmarks/README.md: 32 ids set tenants apart, an equal share of 682 does not).
    domain_size: int | None = Field(default=32, ge=0, description="token ids in each tenant's domain")
    seed: int = 0
    trace: Path | None = Field(default=None, description="replay this JSON-lines trace instead")

    # --- measurement ----------------------------------------------------------------------------
    sample_interval: float = Field(default=0.5, gt=0, description="OS memory/CPU sampling period")
    price_per_gb_s: float = Field(default=AWS_LAMBDA_PRICE_PER_GB_S, ge=0)
    # The cost model's replica memory besides its shard (faasmoe/bench/cost_model.py). None: a replica's PSS
    # measured at the wake of every function before the trace, when no invocation has touched its weights yet:
    # replicas forked from the gateway's runtime share it, far below the 384 MiB a container requests.
    base_memory_mib: int | None = Field(default=None, ge=0, description="cost model: replica memory besides weights")
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
    # After the trace, full-shared and faasmoe-shared also run this many closed-loop streams (None: no run).
    saturation_streams: int | None = Field(default=None, ge=1, description="closed-loop streams of the saturation run")
    saturation_duration: float = Field(default=20.0, gt=0, description="measured seconds of the saturation run")

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

    @field_validator("systems", "experts_per_function", "grouping", mode="before")
    @classmethod
    def _parse_comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("elasticity", mode="before")
    @classmethod
    def _parse_elasticity(cls, values: object) -> object:
        if isinstance(values, str):
            values = [part for part in values.split(",") if part.strip()]
        if isinstance(values, list):
            return [Elasticity.parse(v) if isinstance(v, str) else v for v in values]
        return values

    @field_validator("elasticity", "grouping")
    @classmethod
    def _distinct(cls, values: list) -> list:
        return list(dict.fromkeys(values))

    def resolved(self) -> BenchSettings:
        """The settings in effect: --quick's values for every field not given explicitly."""
        if not self.quick:
            return self
        overrides = {k: v for k, v in QUICK_OVERRIDES.items() if k not in self.model_fields_set}
        return self.model_copy(update=overrides)

    @property
    def cycle(self) -> float:
        return self.burst + self.idle
