"""The benchmark's model and plans, built with the faasmoe CLI (in child processes, so that the benchmark
itself stays small) and cached in the work directory."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from faasmoe.bench.settings import BenchSettings
from faasmoe.errors import FaasmoeError
from faasmoe.model.checkpoint import Checkpoint
from faasmoe.planning.grouping import Grouping
from faasmoe.planning.plan import ModelShape

SUMMARY_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "num_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "vocab_size",
    "dtype",
)


@dataclass(frozen=True)
class ModelInfo:
    """What the benchmark needs to know of the checkpoint: config.json, and the shape its family reads from it."""

    path: Path
    config: dict
    shape: ModelShape  # experts and MoE layers by the family's own fields (faasmoe/model/families.py)

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def num_experts(self) -> int:
        return self.shape.num_experts

    @property
    def num_layers(self) -> int:
        return self.shape.num_hidden_layers

    @property
    def moe_layers(self) -> list[int]:
        return self.shape.moe_layers

    def summary(self) -> dict[str, object]:
        return {k: self.config[k] for k in SUMMARY_KEYS if k in self.config}


@dataclass(frozen=True)
class Assets:
    model: ModelInfo
    plans_dir: Path
    log: Path
    profile: Path | None = None  # the routing profile popularity plans are grouped by (faasmoe/bench/profiling.py)

    def plan(
        self, experts_per_function: int, layers_per_function: int, grouping: Grouping = Grouping.CONTIGUOUS
    ) -> Path:
        """The plan directory for this granularity and grouping, exported on first use."""
        name = f"e{experts_per_function}-l{layers_per_function}"
        command = ["--experts-per-function", str(experts_per_function),
                   "--layers-per-function", str(layers_per_function)]  # fmt: skip
        if grouping is Grouping.POPULARITY:
            if self.profile is None:
                raise FaasmoeError("a popularity plan needs the routing profile, recorded before the plans")
            # One directory per profile: a plan is only as good as the profile it was grouped by.
            name = f"popularity-{self.profile.stem}-{name}"
            command += ["--grouping", grouping.value, "--routing-profile", str(self.profile)]
        path = self.plans_dir / name
        if not (path / "plan.json").is_file():
            _cli(["export", str(self.model.path), str(path), *command], self.log)
        return path

    def weights_bytes(
        self, experts_per_function: int, layers_per_function: int, grouping: Grouping = Grouping.CONTIGUOUS
    ) -> int:
        plan = self.plan(experts_per_function, layers_per_function, grouping)
        return sum(f.stat().st_size for f in plan.rglob("*.safetensors"))


def prepare_model(settings: BenchSettings, log: Path) -> Assets:
    """The given checkpoint, or a random one built by `faasmoe init-model` (reused when it exists)."""
    path = settings.model_dir
    if path is None:
        options = [settings.preset, str(settings.layers), settings.dtype, str(settings.seed), str(settings.router_skew)]
        path = settings.work_dir / "models" / f"{settings.preset}-{_digest(':'.join(options))}"
        if not (path / "config.json").is_file():
            command = ["init-model", str(path), "--preset", settings.preset, "--dtype", settings.dtype]
            command += ["--seed", str(settings.seed), "--router-skew", str(settings.router_skew)]
            if settings.layers is not None:
                command += ["--layers", str(settings.layers)]
            _cli(command, log)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FaasmoeError(f"{path} is not a checkpoint directory: config.json is missing")
    # Plans belong to one checkpoint: keyed by its resolved path.
    plans = settings.work_dir / "plans" / f"{path.name}-{_digest(str(path.resolve()))}"
    model = ModelInfo(path, json.loads(config_file.read_text()), ModelShape.of(Checkpoint.open(path)))
    return Assets(model, plans, log)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _cli(arguments: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        done = subprocess.run([sys.executable, "-m", "faasmoe.cli", *arguments], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise FaasmoeError(f"faasmoe {arguments[0]} failed (exit {done.returncode}):\n{tail}")
