"""Adaptive keep-alive: how long a function stays warm after its last invocation, chosen from its own idle gaps.

The anchor is the hybrid-histogram policy of "Serverless in the Wild" (Shahrad et al., ATC'20): a histogram
of each function's idle times, and a keep-alive at its tail percentile (plus a margin) once the histogram is
representative, else a fixed keep-alive. Here the fixed keep-alive (the function's
``com.openfaas.scale.zero-duration``) is also the upper bound, and a cold start's cost against the memory-time
of staying warm sets a lower bound (the break-even). The rule, and why, is in docs/elasticity.md ("Keep-alive").

Everything here is pure: feed gaps, get a keep-alive. ``simulate`` replays a trace under either mode, for the
benchmark's fixed-vs-adaptive table.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

GB = 1e9  # GB-s as cloud providers bill them: decimal gigabytes


class KeepAliveMode(str, enum.Enum):
    FIXED = "fixed"  # every function keeps its zero-duration label: today's behaviour, no scale calls
    ADAPTIVE = "adaptive"  # the control plane scales a function to zero once idle for its own keep-alive


class Basis(str, enum.Enum):
    """What decided a keep-alive."""

    FIXED = "fixed"  # too little history, or the histogram's tail reaches the upper bound
    HISTOGRAM = "histogram"  # the tail percentile of the function's idle gaps
    BREAK_EVEN = "break_even"  # no longer than a cold start is worth in memory-time, and history asks no more


class KeepAliveSettings(BaseModel):
    """The policy's knobs (``FAASMOE_SERVE_KEEP_ALIVE_POLICY__*``); the defaults are what docs/elasticity.md argues."""

    model_config = ConfigDict(extra="forbid")

    bin_s: float = Field(1.0, gt=0, description="histogram bin width; shorter gaps are the function in use, not idle")
    percentile: float = Field(99.0, gt=0, le=100, description="the idle gaps a keep-alive should bridge")
    margin: float = Field(0.1, ge=0, description="added to the tail, as a share of it")
    min_gaps: int = Field(10, ge=1, description="idle gaps seen before the history is trusted")
    window: int = Field(256, ge=1, description="the most recent idle gaps kept per function")
    cold_start_s: float = Field(1.0, gt=0, description="a cold start's cost until one has been measured")
    check_interval_s: float = Field(1.0, gt=0, description="how often the control plane looks for expired functions")


@dataclass(frozen=True)
class KeepAlive:
    seconds: float
    basis: Basis


def break_even_s(cold_start_s: float, function_bytes: int, plan_bytes: int) -> float:
    """How long keeping the function warm costs the memory-time one of its cold starts does.

    A cold start stalls the step that invokes the function, and a step holds the whole plan: while it waits,
    every function's weights (``plan_bytes``) sit idle for ``cold_start_s``. Staying warm costs the function's
    own weights per second.
    """
    if function_bytes <= 0:
        return math.inf  # holds nothing: staying warm is free
    return cold_start_s * plan_bytes / function_bytes


def histogram_tail_s(gaps: Sequence[float], bin_s: float, percentile: float) -> float:
    """The upper edge of the histogram bin holding ``percentile`` of ``gaps`` (bins of ``bin_s`` from 0)."""
    counts = Counter(int(gap // bin_s) for gap in gaps)
    needed = percentile / 100 * len(gaps)
    seen = 0
    for index in sorted(counts):
        seen += counts[index]
        if seen >= needed:
            return (index + 1) * bin_s
    raise ValueError("no gaps")


def choose_keep_alive(
    gaps: Sequence[float], fixed_s: float, break_even: float, settings: KeepAliveSettings
) -> KeepAlive:
    """The keep-alive for a function whose recent idle gaps are ``gaps``, never longer than ``fixed_s``.

    Fewer than ``min_gaps`` idle gaps: nothing is known yet, ``fixed_s`` (as today). Otherwise the tail
    percentile of the gaps the upper bound could bridge (those up to ``fixed_s``; longer ones go cold under
    any keep-alive up to it) plus the margin, if ``min_gaps`` of them are in range; and at least the
    break-even, so that a pattern that changes costs at most one cold start's worth of memory-time.
    """
    if len(gaps) < settings.min_gaps:
        return KeepAlive(fixed_s, Basis.FIXED)
    in_range = [gap for gap in gaps if gap <= fixed_s]
    tail = 0.0
    if len(in_range) >= settings.min_gaps:
        tail = histogram_tail_s(in_range, settings.bin_s, settings.percentile) * (1 + settings.margin)
    floor = max(break_even, settings.bin_s)  # shorter than a bin is not idle at all
    seconds = max(tail, floor)
    if seconds >= fixed_s:
        return KeepAlive(fixed_s, Basis.FIXED)
    return KeepAlive(seconds, Basis.HISTOGRAM if tail >= floor else Basis.BREAK_EVEN)


@dataclass
class IdleHistory:
    """One function's recent idle gaps (invocation start minus the previous invocation's end, those of at least
    a bin) and round trips (cold and warm), as the control plane sees its invocations."""

    settings: KeepAliveSettings
    gaps: deque[float] = field(init=False)
    last_end: float | None = None
    _cold: deque[float] = field(init=False)
    _warm: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        self.gaps = deque(maxlen=self.settings.window)
        self._cold = deque(maxlen=16)
        self._warm = deque(maxlen=64)

    def observe(self, started: float, ended: float, cold_start: bool) -> bool:
        """Records one invocation; True if it changed what the keep-alive is chosen from (a gap, a cold start)."""
        changed = cold_start
        if self.last_end is not None and started - self.last_end >= self.settings.bin_s:
            self.gaps.append(started - self.last_end)
            changed = True
        (self._cold if cold_start else self._warm).append(ended - started)
        self.last_end = ended if self.last_end is None else max(self.last_end, ended)
        return changed

    def cold_start_s(self) -> float:
        """What a cold start adds to a round trip (medians), or the configured cost until one was seen."""
        if not self._cold:
            return self.settings.cold_start_s
        warm = statistics.median(self._warm) if self._warm else 0.0
        return max(statistics.median(self._cold) - warm, 0.0)


@dataclass(frozen=True)
class TraceCost:
    """A keep-alive policy replayed on a trace: invocations that met a cold function, and warm memory-time."""

    invocations: int
    cold_starts: int
    gb_s: float  # weights held warm: from each invocation until the next one or until the keep-alive ran out


def simulate(
    invocation_times: Mapping[str, Sequence[float]],
    weight_bytes: Mapping[str, int],  # every function of the plan: their sum prices a cold start
    mode: KeepAliveMode,
    fixed_s: float,
    cold_start_s: float,
    settings: KeepAliveSettings | None = None,
    end_s: float | None = None,
) -> TraceCost:
    """Replays per-function invocation times (seconds, any origin) under ``mode``: fixed keeps every function
    ``fixed_s``; adaptive chooses each function's keep-alive after each invocation from the gaps before it
    (online, as the control plane does), with cold starts costing ``cold_start_s``.

    Invocations are instants and a function is warm from its first invocation (always cold) on; after its
    last one it stays warm for its keep-alive, or until ``end_s`` if that comes first.
    """
    settings = settings or KeepAliveSettings()
    plan_bytes = sum(weight_bytes.values())
    invocations = cold_starts = 0
    gb_s = 0.0
    for name, times in invocation_times.items():
        times = sorted(times)
        history = IdleHistory(settings)
        break_even = break_even_s(cold_start_s, weight_bytes[name], plan_bytes)
        keep_alive = fixed_s
        previous: float | None = None
        for now in times:
            invocations += 1
            if previous is None or now - previous > keep_alive:
                cold_starts += 1
            if previous is not None:
                gb_s += min(now - previous, keep_alive) * weight_bytes[name] / GB
            history.observe(now, now, cold_start=False)
            previous = now
            if mode is KeepAliveMode.ADAPTIVE:
                keep_alive = choose_keep_alive(history.gaps, fixed_s, break_even, settings).seconds
        if times:
            tail = keep_alive if end_s is None else min(keep_alive, max(end_s - times[-1], 0.0))
            gb_s += tail * weight_bytes[name] / GB
    return TraceCost(invocations, cold_starts, gb_s)
