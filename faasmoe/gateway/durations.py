"""Go-style durations ("30s", "5m", "1m30s", "500ms"), as OpenFaaS labels write them."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

from faasmoe.errors import FaasmoeError

# Seconds per unit, as Go's time.ParseDuration spells them.
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_TERM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class DurationError(FaasmoeError):
    """A duration string is not in Go's format."""


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string: a sequence of number+unit terms, e.g. "1m30s".

    A bare "0" is allowed (as in Go); negative durations are not, since every
    duration here is a timeout.
    """
    value = text.strip()
    if value == "0":
        return 0.0
    if not value:
        raise DurationError("empty duration: expected e.g. '30s', '5m' or '1m30s'")
    total = 0.0
    position = 0
    for match in _TERM.finditer(value):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(value):
        raise DurationError(
            f"invalid duration {text!r}: expected number+unit terms (units ns, us, ms, s, m, h), "
            "e.g. '30s', '5m', '1m30s' or '500ms'"
        )
    return total


def parse_positive_duration(text: str) -> float:
    """Seconds in a Go duration that must be positive (a timeout, an idle time); raises DurationError."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise DurationError(f"duration {text!r} must be positive")
    return seconds


def _positive_duration(text: str) -> str:
    try:
        parse_positive_duration(text)
    except DurationError as exc:
        raise ValueError(str(exc)) from None
    return text


# A setting holding a positive Go duration, checked where it is given rather than where a label is read.
PositiveDuration = Annotated[str, AfterValidator(_positive_duration)]
