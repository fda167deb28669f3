"""Prometheus metrics of the control plane: per tenant, per function, the engine and the trunk's memory.

Each server has its own registry (several servers may share a process in tests and benchmarks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: N811
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from torch import nn

from faasmoe.dispatch.remote import Invocation
from faasmoe.elastic.lookahead import LookaheadCounts
from faasmoe.elastic.prewarm import WakeOutcome
from faasmoe.elastic.routing_stats import RoutingStats
from faasmoe.gateway.schemas import FunctionStatus
from faasmoe.memory import resident_memory
from faasmoe.model.moe_block import RoutedTime, SplitMoeBlock

if TYPE_CHECKING:
    from faasmoe.server.sequence import Sequence

__all__ = ["CONTENT_TYPE", "Metrics", "StepBreakdown"]

# Buckets in seconds: a token takes milliseconds when warm, a cold start takes seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The step breakdown and the invocation overhead: from 0.1 ms (a warm call's overhead) to a minute.
FINE_BUCKETS = (
    *(0.0001, 0.00015, 0.0002, 0.0003, 0.0004, 0.0005, 0.00075),
    *(0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075),
    *(0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075),
    *(0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
PREFILL, DECODE = "prefill", "decode"  # a step's phase: whether it computed some sequence's prompt
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        tenant = ["tenant"]
        function = ["function"]
        self.requests = Counter(
            "faasmoe_requests",
            "Requests by tenant, endpoint and HTTP status",
            [*tenant, "endpoint", "status"],
            registry=registry,
        )
        self.tokens = Counter(
            "faasmoe_tokens", "Tokens by tenant and kind (prompt, completion)", [*tenant, "kind"], registry=registry
        )
        self.errors = Counter(
            "faasmoe_request_errors", "Failed requests by tenant and error type", [*tenant, "type"], registry=registry
        )
        self.ttft = Histogram(
            "faasmoe_time_to_first_token_seconds",
            "Request arrival to its first token",
            tenant,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "faasmoe_time_per_output_token_seconds",
            "Gap between a request's tokens",
            tenant,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.invocations = Counter(
            "faasmoe_function_invocations", "Expert function invocations", function, registry=registry
        )
        self.invocation_latency = Histogram(
            "faasmoe_function_latency_seconds",
            "Expert function round trip",
            function,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.invocation_bytes = Counter(
            "faasmoe_function_bytes",
            "Bytes to (sent) and from (received) functions",
            [*function, "direction"],
            registry=registry,
        )
        self.cold_starts = Counter(
            "faasmoe_function_cold_starts", "Invocations that met a fresh replica", function, registry=registry
        )
        self.replicas = Gauge(
            "faasmoe_function_replicas", "Ready replicas as the gateway reports them", function, registry=registry
        )
        self.prewarms = Counter(
            "faasmoe_prewarm_calls",
            "Prewarm wakes by function and outcome: scaled, already_up, not_found, failed",
            [*function, "outcome"],
            registry=registry,
        )
        self.prewarm_prediction_failures = Counter(
            "faasmoe_prewarm_prediction_failures",
            "Admitted requests for which predicting the functions to prewarm failed",
            registry=registry,
        )
        self.keep_alive = Gauge(
            "faasmoe_keep_alive_seconds",
            "--keep-alive adaptive: how long each function stays warm after its last invocation",
            function,
            registry=registry,
        )
        self.keep_alive_scale_downs = Counter(
            "faasmoe_keep_alive_scale_downs",
            "--keep-alive adaptive: functions the control plane scaled to zero, idle past their keep-alive",
            function,
            registry=registry,
        )
        self.replica_scale_outs = Counter(
            "faasmoe_replica_scale_outs",
            "Hot replicas: replicas added to a function whose calls queued past --replica-queue-target-ms",
            function,
            registry=registry,
        )
        self.replica_scale_ins = Counter(
            "faasmoe_replica_scale_ins",
            "Hot replicas: added replicas taken back once the function's queueing stayed low",
            function,
            registry=registry,
        )
        self.active_sequences = Gauge(
            "faasmoe_active_sequences",
            "Sequences holding a KV cache (running or waiting)",
            ["engine"],
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "faasmoe_step_tokens", "Sequences stepped together", ["engine"], buckets=TOKEN_BUCKETS, registry=registry
        )
        step = ["engine", "phase"]
        self.step_seconds = Histogram(
            "faasmoe_step_seconds",
            "Duration of one engine step (trunk, routed experts, sampling)",
            step,
            buckets=FINE_BUCKETS,
            registry=registry,
        )
        self.step_trunk = Histogram(
            "faasmoe_step_trunk_seconds",
            "Of a step, the control plane's own compute: attention, norms, routers, shared experts, LM head, sampling",
            step,
            buckets=FINE_BUCKETS,
            registry=registry,
        )
        self.step_expert_submit = Histogram(
            "faasmoe_step_expert_submit_seconds",
            "Of a step, handing routed experts to the executor: scatter and encode, or in-process their compute",
            step,
            buckets=FINE_BUCKETS,
            registry=registry,
        )
        self.step_expert_wait = Histogram(
            "faasmoe_step_expert_wait_seconds",
            "Of a step, the trunk blocked on routed experts after computing the shared expert",
            step,
            buckets=FINE_BUCKETS,
            registry=registry,
        )
        self.function_compute = Histogram(
            "faasmoe_function_compute_seconds",
            "A warm invocation's compute inside the function (its compute header)",
            function,
            buckets=FINE_BUCKETS,
            registry=registry,
        )
        self.function_overhead = Histogram(
            "faasmoe_function_overhead_seconds",
            "A warm invocation's round trip minus its compute: gateway queueing, transport, thread hops, decoding",
            function,
            buckets=FINE_BUCKETS,
            registry=registry,
        )
        self.function_queue = Histogram(
            "faasmoe_function_queue_seconds",
            "An invocation's wait in its replica for the compute thread (its queue header): what replicas remove",
            function,
            buckets=FINE_BUCKETS,
            registry=registry,
        )
        self.memory = Gauge(
            "faasmoe_control_plane_memory_bytes",
            "Resident memory of the control plane (trunk)",
            ["kind"],
            registry=registry,
        )

    def observe_invocation(self, invocation: Invocation) -> None:
        """An InvocationLog observer (called on the dispatch thread; prometheus-client is thread safe)."""
        name = invocation.function
        self.invocations.labels(name).inc()
        self.invocation_latency.labels(name).observe(invocation.seconds)
        self.invocation_bytes.labels(name, "sent").inc(invocation.bytes_sent)
        self.invocation_bytes.labels(name, "received").inc(invocation.bytes_received)
        if invocation.cold_start:
            self.cold_starts.labels(name).inc()
        # A cold start's wait is not overhead a warm call pays: the latency histogram holds it.
        elif invocation.compute_seconds is not None:
            self.function_compute.labels(name).observe(invocation.compute_seconds)
            self.function_overhead.labels(name).observe(invocation.overhead_seconds)
        if invocation.queue_seconds is not None:
            self.function_queue.labels(name).observe(invocation.queue_seconds)

    def observe_step(self, engine: str, phase: str, sequences: int, seconds: float, routed: RoutedTime) -> None:
        """One step's ``seconds``, of which ``routed`` went to the routed experts and the rest to the trunk."""
        self.batch_tokens.labels(engine).observe(sequences)
        self.step_seconds.labels(engine, phase).observe(seconds)
        self.step_trunk.labels(engine, phase).observe(seconds - routed.submit_s - routed.wait_s)
        self.step_expert_submit.labels(engine, phase).observe(routed.submit_s)
        self.step_expert_wait.labels(engine, phase).observe(routed.wait_s)

    def set_replicas(self, functions: list[FunctionStatus]) -> None:
        for status in functions:
            self.replicas.labels(status.name).set(status.available_replicas)

    def observe_wake(self, function: str, outcome: WakeOutcome) -> None:
        """A PrewarmObserver (called on the dispatch thread)."""
        self.prewarms.labels(function, outcome.value).inc()

    def observe_prediction_failure(self) -> None:
        self.prewarm_prediction_failures.inc()

    def observe_keep_alive(self, function: str, seconds: float) -> None:
        self.keep_alive.labels(function).set(seconds)

    def observe_scale_down(self, function: str) -> None:
        self.keep_alive_scale_downs.labels(function).inc()

    def observe_replica_scale_out(self, function: str) -> None:
        """A ReplicaObserver (called on the dispatch thread)."""
        self.replica_scale_outs.labels(function).inc()

    def observe_replica_scale_in(self, function: str) -> None:
        self.replica_scale_ins.labels(function).inc()

    def count_routing(self, stats: RoutingStats) -> None:
        """Exposes ``stats``' totals as faasmoe_routed_slots_total, read at each scrape (RoutedSlots)."""
        self.registry.register(RoutedSlots(stats))

    def count_lookahead(self, counts: list[LookaheadCounts]) -> None:
        """Exposes the engines' next-layer lookahead counts, summed, read at each scrape (LookaheadHits)."""
        self.registry.register(LookaheadHits(counts))

    def render(self, active_sequences: dict[str, int]) -> bytes:
        for engine, count in active_sequences.items():
            self.active_sequences.labels(engine).set(count)
        for kind, value in resident_memory().as_dict().items():
            self.memory.labels(kind).set(value)
        return generate_latest(self.registry)


class StepBreakdown:
    """An engine's step hooks: each step's seconds, split by the routed-expert time its MoE blocks took.

    ``start`` (a step_starting hook) clears what a failed step left in the blocks and notes the phase;
    the instance itself is the step observer.
    """

    def __init__(self, metrics: Metrics, engine: str, trunk: nn.Module) -> None:
        self.metrics = metrics
        self.engine = engine
        self.blocks = [module for module in trunk.modules() if isinstance(module, SplitMoeBlock)]
        self.phase = DECODE

    def start(self, batch: list[Sequence]) -> None:
        for block in self.blocks:
            block.routed_time.take()
        # A sequence without output yet computes its prompt in this step.
        self.phase = PREFILL if any(not seq.output for seq in batch) else DECODE

    def __call__(self, batch: list[Sequence], seconds: float) -> None:
        routed = RoutedTime()
        for block in self.blocks:
            taken = block.routed_time.take()
            routed.add(taken.submit_s, taken.wait_s)
        self.metrics.observe_step(self.engine, self.phase, len(batch), seconds, routed)


class RoutedSlots(Collector):
    """faasmoe_routed_slots_total{tenant, layer, expert}: token slots the routers sent to each expert.

    Read from the routing statistics at scrape time, so the engine's hot path touches no Prometheus
    series. Series with no slots are left out; at most tenants x MoE layers x experts series (for
    Qwen1.5-MoE, 24 x 60 = 1440 per tenant).
    """

    def __init__(self, stats: RoutingStats) -> None:
        self.stats = stats

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily("faasmoe_routed_slots", "Token slots routed to each MoE layer's expert",
                                     labels=["tenant", "layer", "expert"])  # fmt: skip
        for tenant, table in self.stats.totals().items():
            rows, experts = table.nonzero(as_tuple=True)
            for row, expert, slots in zip(rows.tolist(), experts.tolist(), table[rows, experts].tolist(), strict=True):
                family.add_metric([tenant, str(self.stats.moe_layers[row]), str(expert)], slots)
        return [family]


class LookaheadHits(Collector):
    """faasmoe_lookahead_*_total: how the next-layer lookahead's guesses did, over all engines.

    Slots: correct / predicted is the share of the guessed layers' (token, expert) choices it foresaw.
    Functions: foreseen / invoked is the share of those layers' invoked functions it woke (or found warm)
    ahead; predicted - foreseen are its guesses for nothing. Read at scrape time, as RoutedSlots.
    """

    HELP = {
        "predicted_slots": "Next-layer lookahead: (token, expert) choices guessed",
        "correct_slots": "Next-layer lookahead: guessed (token, expert) choices the router made",
        "predicted_functions": "Next-layer lookahead: (step, layer, function) guessed",
        "invoked_functions": "Next-layer lookahead: (step, layer, function) invoked in the layers it guessed",
        "foreseen_functions": "Next-layer lookahead: (step, layer, function) invoked and guessed",
        "failures": "Next-layer lookahead: guesses that raised (the step went on)",
    }

    def __init__(self, counts: list[LookaheadCounts]) -> None:
        self.counts = counts

    def collect(self) -> list[CounterMetricFamily]:
        return [
            CounterMetricFamily(f"faasmoe_lookahead_{name}", text, value=sum(getattr(c, name) for c in self.counts))
            for name, text in self.HELP.items()
        ]
