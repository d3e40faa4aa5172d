"""Prometheus metrics, one registry per process (no global default registry)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.handled = Counter(
            "darkroom_events_handled",
            "Events a function finished, by outcome (ok, retry, cancelled, dead_lettered)",
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
        self.gpu_capacity_mb = self._gpu_gauge(
            "darkroom_gpu_capacity_mb", "Memory of a device in the VRAM lease ledger"
        )
        self.gpu_used_mb = self._gpu_gauge(
            "darkroom_gpu_used_mb", "Memory held by live VRAM leases on a device"
        )
        self.gpu_leases = self._gpu_gauge("darkroom_gpu_leases", "Live VRAM leases on a device")
        self.gpu_queued = self._gpu_gauge(
            "darkroom_gpu_queued", "Requests waiting for VRAM on a device"
        )

    def _gpu_gauge(self, name: str, documentation: str) -> Gauge:
        return Gauge(name, documentation, ["host", "device"], registry=self.registry)

    def set_gpus(self, devices: Iterable[dict[str, Any]]) -> None:
        """Replace the GPU gauges with ``devices`` (as from :func:`bus.gpu.leases.read_devices`)."""
        gauges = (self.gpu_capacity_mb, self.gpu_used_mb, self.gpu_leases, self.gpu_queued)
        for gauge in gauges:
            gauge.clear()  # a device gone from the ledger drops out
        for d in devices:
            labels = {"host": d["host"], "device": d["device"]}
            self.gpu_capacity_mb.labels(**labels).set(d["capacity_mb"])
            self.gpu_used_mb.labels(**labels).set(d["used_mb"])
            self.gpu_leases.labels(**labels).set(len(d["leases"]))
            self.gpu_queued.labels(**labels).set(len(d["queue"]))
