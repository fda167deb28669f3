"""Prometheus metrics of the control plane: per tenant, per function, the engine and the trunk's memory.

Each server has its own registry (several servers may share a process in tests and benchmarks).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: N811
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from faasmoe.dispatch.remote import Invocation
from faasmoe.gateway.schemas import FunctionStatus
from faasmoe.memory import resident_memory

__all__ = ["CONTENT_TYPE", "Metrics"]

# Buckets in seconds: a token takes milliseconds when warm, a cold start takes seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
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
        self.active_sequences = Gauge(
            "faasmoe_active_sequences",
            "Sequences holding a KV cache (running or waiting)",
            ["engine"],
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "faasmoe_step_tokens", "Sequences stepped together", ["engine"], buckets=TOKEN_BUCKETS, registry=registry
        )
        self.step_seconds = Histogram(
            "faasmoe_step_seconds",
            "Duration of one engine step",
            ["engine"],
            buckets=LATENCY_BUCKETS,
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

    def observe_step(self, engine: str, sequences: int, seconds: float) -> None:
        self.batch_tokens.labels(engine).observe(sequences)
        self.step_seconds.labels(engine).observe(seconds)

    def set_replicas(self, functions: list[FunctionStatus]) -> None:
        for status in functions:
            self.replicas.labels(status.name).set(status.available_replicas)

    def render(self, active_sequences: dict[str, int]) -> bytes:
        for engine, count in active_sequences.items():
            self.active_sequences.labels(engine).set(count)
        for kind, value in resident_memory().as_dict().items():
            self.memory.labels(kind).set(value)
        return generate_latest(self.registry)
