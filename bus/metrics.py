"""Prometheus metrics, one registry per process (no global default registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.handled = Counter(
            "darkroom_events_handled",
            "Events a function finished, by outcome (ok, retry, rejected, dead_lettered)",
            ["function", "outcome"],
            registry=self.registry,
        )
        self.handler_seconds = Histogram(
            "darkroom_handler_seconds",
            "Time inside a function's handler",
            ["function"],
            registry=self.registry,
            buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 60, 300),
        )
        self.in_flight = Gauge(
            "darkroom_in_flight",
            "Handler invocations running",
            ["function"],
            registry=self.registry,
        )
        self.consumer_pending = Gauge(
            "darkroom_consumer_pending",
            "Events waiting for a function (JetStream num_pending)",
            ["function"],
            registry=self.registry,
        )
        self.consumer_ack_pending = Gauge(
            "darkroom_consumer_ack_pending",
            "Events delivered to a function and not yet acknowledged",
            ["function"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "darkroom_http_requests",
            "Gateway requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
