"""The worker's Prometheus metrics, registered on a registry the caller owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["WorkerMetrics"]

_OP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.commands = Counter(
            "vmfleet_worker_commands",
            "Commands executed, by op and outcome (ok or error code)",
            ["op", "outcome"],
            registry=registry,
        )
        self.op_duration = Histogram(
            "vmfleet_worker_op_seconds",
            "Duration of lifecycle operations",
            ["op"],
            registry=registry,
            buckets=_OP_BUCKETS,
        )
        self.instances = Gauge(
            "vmfleet_worker_instances",
            "Instances on this host by state",
            ["state"],
            registry=registry,
        )
        self.pull_duration = Histogram(
            "vmfleet_worker_image_pull_seconds",
            "Image pull and conversion time",
            registry=registry,
            buckets=_OP_BUCKETS,
        )
        self.nats_reconnects = Counter(
            "vmfleet_worker_nats_reconnects",
            "Reconnections to NATS",
            registry=registry,
        )
        self.command_fetch_failures = Counter(
            "vmfleet_worker_command_fetch_failures",
            "Failed fetches of this host's commands from NATS",
            registry=registry,
        )
        self.command_redeliveries_held = Counter(
            "vmfleet_worker_command_redeliveries_held",
            "Commands JetStream redelivered while this worker still held them (not run again)",
            registry=registry,
        )
        self.command_fetch_failing = Gauge(
            "vmfleet_worker_command_fetch_failing",
            "1 while fetching this host's commands fails (the worker exits if it lasts)",
            registry=registry,
        )
        self.log_lines = Counter(
            "vmfleet_worker_log_lines",
            "Log lines published, by source",
            ["source"],
            registry=registry,
        )
        self.refused_transitions = Counter(
            "vmfleet_worker_refused_transitions",
            "Changes of state refused because the state table has no such edge (a bug)",
            ["previous", "state", "cause"],
            registry=registry,
        )
        self.guest_sessions = Gauge(
            "vmfleet_worker_guest_sessions",
            "Guest sessions (exec, cp) open on this host",
            ["kind"],
            registry=registry,
        )
        self.guest_session_bytes = Counter(
            "vmfleet_worker_guest_session_bytes",
            "Bytes relayed by guest sessions, to_guest or from_guest",
            ["direction"],
            registry=registry,
        )
        self.transfer_bytes = Counter(
            "vmfleet_worker_transfer_bytes",
            "Bytes a host sent to or fetched from the transfers store, by direction",
            ["direction"],
            registry=registry,
        )
        self.transfer_duration = Histogram(
            "vmfleet_worker_transfer_seconds",
            "Duration of one bundle's upload or fetch (checksums included)",
            ["direction"],
            registry=registry,
            buckets=_OP_BUCKETS,
        )
        self.create_phase = Histogram(
            "vmfleet_worker_create_phase_seconds",
            "Time of each step of a create: pull, disks, vmm, boot (kernel to init), "
            "agent (init to the guest agent's answer)",
            ["phase"],
            registry=registry,
            buckets=_OP_BUCKETS,
        )
        self.exec_duration = Histogram(
            "vmfleet_worker_exec_seconds",
            "Duration of exec sessions, open to end",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
        )

    def observe_create_phase(self, phase: str, seconds: float) -> None:
        self.create_phase.labels(phase=phase).observe(seconds)

    def count_refused_transition(self, previous: str, state: str, cause: str) -> None:
        self.refused_transitions.labels(previous, state, cause).inc()

    def observe_transfer(self, direction: str, size: int, seconds: float) -> None:
        """One bundle sent (``sent``) or fetched (``fetched``) by this host."""
        self.transfer_bytes.labels(direction=direction).inc(size)
        self.transfer_duration.labels(direction=direction).observe(seconds)
