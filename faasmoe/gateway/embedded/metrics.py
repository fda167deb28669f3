"""The gateway's Prometheus metrics, named as the OpenFaaS gateway names them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class GatewayMetrics:
    """One registry per gateway app, so several apps in one process (tests) do not collide."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.invocations = Counter(
            "gateway_function_invocation",  # exposed as gateway_function_invocation_total
            "Function invocations by status code",
            ["function_name", "code"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "gateway_functions_seconds",
            "Function invocation time taken",
            ["function_name", "code"],
            registry=self.registry,
        )
        self.service_count = Gauge(
            "gateway_service_count",
            "Desired replicas of each function",
            ["function_name"],
            registry=self.registry,
        )

    def observe_invocation(self, function: str, code: int, seconds: float) -> None:
        self.invocations.labels(function_name=function, code=str(code)).inc()
        self.seconds.labels(function_name=function, code=str(code)).observe(seconds)

    def render(self, replicas: dict[str, int]) -> bytes:
        """The exposition text, with the service counts refreshed from ``replicas``."""
        self.service_count.clear()  # deleted functions disappear
        for function, count in replicas.items():
            self.service_count.labels(function_name=function).set(count)
        return generate_latest(self.registry)
