"""The wake's Prometheus metrics, on the worker's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["WakeMetrics"]

_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)


class WakeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.wakes = Counter(
            "vmfleet_worker_wakes",
            "Instances woken from Standby, by cause (connection: a client connected to a "
            "mapped port; api: a restore asked for)",
            ["cause"],
            registry=registry,
        )
        self.latency = Histogram(
            "vmfleet_worker_wake_seconds",
            "Wake latency: connection: from accepting the first connection to relaying it to "
            "the guest; api: from the restore's start to the guest running",
            ["cause"],
            registry=registry,
            buckets=_BUCKETS,
        )

    def woke(self, cause: str, seconds: float) -> None:
        self.wakes.labels(cause=cause).inc()
        self.latency.labels(cause=cause).observe(seconds)
