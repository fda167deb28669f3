"""The routing profile: the decayed routing statistics as a JSON file that outlives the process.

`faasmoe serve --routing-profile FILE` loads it at start if it exists and writes it back every
``--routing-profile-interval`` seconds and on shutdown, atomically (a temporary file, then os.replace).
The format is documented in docs/elasticity.md ("Routing profile").

It is a cache, so an unreadable or corrupt file is warned about and replaced by fresh statistics. A
profile written for another model (or by a newer faasmoe) is refused instead: it is some other
deployment's learning, which the next write would otherwise overwrite.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, ValidationError, model_validator

from faasmoe.elastic.routing_stats import RoutingStats
from faasmoe.errors import FaasmoeError
from faasmoe.files import atomic_path

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
DEFAULT_INTERVAL_S = 60.0


class RoutingProfileError(FaasmoeError):
    """A routing profile is another model's, or of a version this faasmoe does not read."""


class RoutingProfile(BaseModel):
    version: Literal[1] = PROFILE_VERSION
    model: str  # the served model name
    moe_layers: list[int]  # the rows of each tenant's table, in this order
    num_experts: int = Field(ge=1)  # the columns
    half_life_s: float = Field(gt=0)  # what the counts decay with (the writer's setting)
    decayed_to: float  # seconds since the epoch: the counts are as of this time
    tenants: dict[str, list[list[float]]]  # tenant -> [layer][expert] decayed token slots

    @model_validator(mode="after")
    def _tables_fit(self) -> RoutingProfile:
        for tenant, table in self.tenants.items():
            if len(table) != len(self.moe_layers) or any(len(row) != self.num_experts for row in table):
                raise ValueError(f"tenant {tenant!r}: expected {len(self.moe_layers)} rows of {self.num_experts}")
            if not all(math.isfinite(c) and c >= 0 for row in table for c in row):
                raise ValueError(f"tenant {tenant!r}: counts must be finite and non-negative")
        return self

    @classmethod
    def of(cls, stats: RoutingStats, model: str) -> RoutingProfile:
        now, tables = stats.decayed()
        return cls(model=model, moe_layers=stats.moe_layers, num_experts=stats.num_experts,
                   half_life_s=stats.half_life_s, decayed_to=now,
                   tenants={tenant: table.tolist() for tenant, table in tables.items()})  # fmt: skip

    def tables(self) -> dict[str, torch.Tensor]:
        """Per tenant its decayed counts [L, E] as of ``decayed_to``."""
        return {tenant: torch.tensor(rows, dtype=torch.float64) for tenant, rows in self.tenants.items()}


class UnreadableProfile(RoutingProfileError):
    """The file is not a profile: not text, not JSON, or malformed."""


def read_profile_file(path: Path) -> RoutingProfile:
    """The profile in ``path``. Raises FileNotFoundError, UnreadableProfile, or RoutingProfileError for a
    version this faasmoe does not read; whose model it is, the caller checks."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON
        raise UnreadableProfile(f"routing profile {path} is unreadable: {exc}") from None
    version = document.get("version") if isinstance(document, dict) else None
    if isinstance(version, int) and version > PROFILE_VERSION:
        raise RoutingProfileError(
            f"routing profile {path} is version {version}; this faasmoe reads version {PROFILE_VERSION}: "
            "upgrade faasmoe or point --routing-profile elsewhere"
        )
    try:
        return RoutingProfile.model_validate(document)
    except ValidationError as exc:
        raise UnreadableProfile(f"routing profile {path} is malformed: {exc}") from None


def load_profile(path: Path, stats: RoutingStats, model: str) -> bool:
    """Restores ``path`` into the (fresh) ``stats``; False when there is no usable profile there.

    Raises RoutingProfileError for another model's profile or a newer version.
    """
    try:
        profile = read_profile_file(path)
    except FileNotFoundError:
        return False
    except UnreadableProfile as exc:  # a cache: serving goes on without it
        log.warning("%s; starting with fresh routing statistics", exc)
        return False
    made_for = (profile.model, profile.moe_layers, profile.num_experts)
    serving = (model, stats.moe_layers, stats.num_experts)
    if made_for != serving:
        raise RoutingProfileError(
            f"routing profile {path} was made for {_describe(*made_for)}, this server serves {_describe(*serving)}: "
            "point --routing-profile at this model's own file, or delete it to start afresh"
        )
    stats.restore(profile.decayed_to, profile.tables())
    log.info("routing profile %s: %d tenants, decayed to %.0f", path, len(profile.tenants), profile.decayed_to)
    return True


def save_profile(path: Path, stats: RoutingStats, model: str) -> None:
    """Writes the profile atomically: a reader (or a crash) sees the old file or the new one, never half."""
    text = RoutingProfile.of(stats, model).model_dump_json() + "\n"
    with atomic_path(path, private=True) as partial:  # private: the profile tells each tenant's traffic
        partial.write_text(text)


class ProfileWriter:
    """Writes the profile every ``interval_s`` on its own thread, and once more on ``stop``.

    A failed write (disk full, permissions) is logged and tried again at the next interval: serving
    goes on without it.
    """

    def __init__(self, path: Path, stats: RoutingStats, model: str, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.path, self.stats, self.model, self.interval_s = path, stats, model, interval_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faasmoe-routing-profile", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops the periodic writes, then writes the final profile."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self._write()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self._write()

    def _write(self) -> None:
        try:
            save_profile(self.path, self.stats, self.model)
        except Exception:
            log.exception("writing the routing profile %s failed", self.path)


def _describe(model: str, moe_layers: list[int], num_experts: int) -> str:
    return f"model {model!r} ({len(moe_layers)} MoE layers {moe_layers}, {num_experts} experts each)"
