"""Token-length distributions for prompts and outputs, written on the command line as short specs.

    "32"                 always 32
    "uniform:16-64"      uniform integers in [16, 64]
    "lognormal:48,0.5"   log-normal with median 48 and sigma 0.5 (the shape of real prompt lengths)

Every draw is clipped to [1, max_tokens] so that a long tail cannot exceed the model's context.
"""

from __future__ import annotations

import math
import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

# A draw above this is clipped: long enough for any benchmark, short enough for any preset's context.
DEFAULT_MAX_TOKENS = 1024


class LengthDistribution(BaseModel):
    """A distribution of token counts; ``parse`` reads the command-line spec."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["fixed", "uniform", "lognormal"] = "fixed"
    low: int = Field(default=32, ge=1, description="fixed value, or lower bound of uniform")
    high: int = Field(default=32, ge=1, description="upper bound of uniform")
    median: float = Field(default=32.0, gt=0, description="median of lognormal")
    sigma: float = Field(default=0.5, ge=0, description="sigma of lognormal (of the log)")
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> LengthDistribution:
        if self.kind == "uniform" and self.high < self.low:
            raise ValueError(f"uniform length: high {self.high} < low {self.low}")
        return self

    @classmethod
    def parse(cls, spec: str) -> LengthDistribution:
        """Reads "N", "fixed:N", "uniform:A-B" or "lognormal:MEDIAN,SIGMA"; raises ValueError otherwise."""
        kind, _, args = spec.strip().partition(":")
        try:
            if not args and kind.isdigit():
                return cls(kind="fixed", low=int(kind), high=int(kind))
            if kind == "fixed":
                return cls(kind="fixed", low=int(args), high=int(args))
            if kind == "uniform":
                low, _, high = args.partition("-")
                return cls(kind="uniform", low=int(low), high=int(high))
            if kind == "lognormal":
                median, _, sigma = args.partition(",")
                return cls(kind="lognormal", median=float(median), sigma=float(sigma))
        except ValueError as exc:
            raise ValueError(f"bad length spec {spec!r}: {exc}") from None
        raise ValueError(f"bad length spec {spec!r}: use N, uniform:A-B or lognormal:MEDIAN,SIGMA")

    @model_serializer
    def _as_spec(self) -> str:
        return str(self)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            value = self.low
        elif self.kind == "uniform":
            value = rng.randint(self.low, self.high)
        else:
            value = round(math.exp(rng.gauss(math.log(self.median), self.sigma)))
        return max(1, min(self.max_tokens, value))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(self.low)
        if self.kind == "uniform":
            return f"uniform:{self.low}-{self.high}"
        return f"lognormal:{self.median:g},{self.sigma:g}"
