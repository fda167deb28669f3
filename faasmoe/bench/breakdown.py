"""Where a decode step's time goes, read from the control planes' /metrics before and after a measured window.

The servers observe every step (faasmoe.server.metrics.StepBreakdown): its seconds, and of them the
routed experts' hand-off (scatter and encode; in-process, the whole expert compute), the wait for the
functions after the shared expert, and the rest, the trunk's own compute. Every warm function call
adds its compute (the function's header) and its overhead (round trip minus compute). The window's
figures are the difference of two scrapes, summed over the system's servers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from faasmoe.bench.metrics import Percentiles

METRICS_KEY = "bench-operator-metrics"  # --metrics-key of every server the benchmark starts
DECODE = "decode"  # faasmoe.server.metrics.DECODE: steps that computed no prompt


@dataclass
class Histogram:
    """A Prometheus histogram: cumulative counts by upper bound, with its count and sum."""

    buckets: dict[float, float] = field(default_factory=dict)
    count: float = 0.0
    sum: float = 0.0

    def plus(self, other: Histogram, sign: float = 1.0) -> Histogram:
        bounds = set(self.buckets) | set(other.buckets)
        buckets = {b: self.buckets.get(b, 0.0) + sign * other.buckets.get(b, 0.0) for b in bounds}
        return Histogram(buckets, self.count + sign * other.count, self.sum + sign * other.sum)

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """Prometheus's histogram_quantile: linear within the bucket holding the q-th observation."""
        if self.count <= 0:
            return None
        rank, lower, below = q * self.count, 0.0, 0.0
        for bound in sorted(self.buckets):
            cumulative = self.buckets[bound]
            if cumulative >= rank and cumulative > below:
                if math.isinf(bound):
                    return lower  # beyond the last finite bound: its lower edge, as Prometheus answers
                return lower + (bound - lower) * (rank - below) / (cumulative - below)
            lower, below = bound, cumulative
        return lower

    def percentiles(self) -> Percentiles:
        return Percentiles(self.quantile(0.5), self.quantile(0.99), self.mean)


@dataclass
class Scrape:
    """Histograms and counters by name, each summed over every label set that matches a filter later."""

    histograms: dict[str, dict[frozenset, Histogram]] = field(default_factory=lambda: defaultdict(dict))
    counters: dict[str, dict[frozenset, float]] = field(default_factory=lambda: defaultdict(dict))

    @classmethod
    def parse(cls, text: str) -> Scrape:
        scrape = cls()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k != "le"}
                key = frozenset(labels.items())
                if family.type == "histogram":
                    histogram = scrape.histograms[family.name].setdefault(key, Histogram())
                    if sample.name.endswith("_bucket"):
                        histogram.buckets[float(sample.labels["le"])] = sample.value
                    elif sample.name.endswith("_count"):
                        histogram.count = sample.value
                    elif sample.name.endswith("_sum"):
                        histogram.sum = sample.value
                elif family.type == "counter" and sample.name.endswith("_total"):
                    scrape.counters[family.name][key] = sample.value
        return scrape

    def plus(self, other: Scrape, sign: float = 1.0) -> Scrape:
        """Summed series by series (several servers), or with ``sign`` -1 the difference (a window)."""
        result = Scrape()
        for name in set(self.histograms) | set(other.histograms):
            mine, theirs = self.histograms.get(name, {}), other.histograms.get(name, {})
            for key in set(mine) | set(theirs):
                result.histograms[name][key] = mine.get(key, Histogram()).plus(theirs.get(key, Histogram()), sign)
        for name in set(self.counters) | set(other.counters):
            mine_c, theirs_c = self.counters.get(name, {}), other.counters.get(name, {})
            for key in set(mine_c) | set(theirs_c):
                result.counters[name][key] = mine_c.get(key, 0.0) + sign * theirs_c.get(key, 0.0)
        return result

    def histogram(self, name: str, **labels: str) -> Histogram:
        """Every series of ``name`` whose labels include ``labels``, summed."""
        total = Histogram()
        for key, histogram in self.histograms.get(name, {}).items():
            if set(labels.items()) <= key:
                total = total.plus(histogram)
        return total

    def counter(self, name: str, **labels: str) -> float:
        """Every series of ``name`` whose labels include ``labels``, summed."""
        return sum(value for key, value in self.counters.get(name, {}).items() if set(labels.items()) <= key)


def scrape(urls: list[str], timeout_s: float = 30.0) -> Scrape:
    """Every server's /metrics, summed."""
    total = Scrape()
    headers = {"Authorization": f"Bearer {METRICS_KEY}"}
    with httpx.Client(timeout=timeout_s, trust_env=False) as http:
        for url in urls:
            response = http.get(url + "/metrics", headers=headers)
            response.raise_for_status()
            total = total.plus(Scrape.parse(response.text))
    return total


@dataclass(frozen=True)
class StepFigures:
    """Decode steps of one window: seconds per step (means add up to the step's mean) and per warm call."""

    decode_steps: int
    step_s: Percentiles
    trunk_s: float | None  # attention, norms, routers, shared experts, LM head, sampling
    expert_submit_s: float | None  # scatter + encode; without functions, the routed experts' whole compute
    expert_wait_s: float | None  # blocked on the functions after the shared expert
    calls_per_step: float | None  # function invocations per step (every phase); None: no functions
    call_compute_s: Percentiles  # inside the function, warm calls
    call_overhead_s: Percentiles  # round trip minus compute: gateway, transport, thread hops, decoding


def step_figures(before: Scrape, after: Scrape) -> StepFigures:
    window = after.plus(before, sign=-1.0)
    step = window.histogram("faasmoe_step_seconds", phase=DECODE)
    all_steps = window.histogram("faasmoe_step_seconds").count
    calls = window.counter("faasmoe_function_invocations")
    return StepFigures(
        decode_steps=round(step.count),
        step_s=step.percentiles(),
        trunk_s=window.histogram("faasmoe_step_trunk_seconds", phase=DECODE).mean,
        expert_submit_s=window.histogram("faasmoe_step_expert_submit_seconds", phase=DECODE).mean,
        expert_wait_s=window.histogram("faasmoe_step_expert_wait_seconds", phase=DECODE).mean,
        calls_per_step=calls / all_steps if calls and all_steps else None,
        call_compute_s=window.histogram("faasmoe_function_compute_seconds").percentiles(),
        call_overhead_s=window.histogram("faasmoe_function_overhead_seconds").percentiles(),
    )
