"""What a running instance uses, read on its host: ``GET /instances/{id}/stats`` and the
per-instance series of the worker's own ``/metrics``.

CPU time and memory come from the VMM's /proc (the whole hypervisor process, as hypeman
measures them); network bytes from the instance's TAP in bridge mode, turned round to
the guest's point of view (what the TAP sends, the guest receives). In user mode QEMU
moves the packets inside its own process and keeps no counters: the network bytes are
0 there. An instance without a VMM (Stopped, Standby) uses nothing: all zeros.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final

from msgspec import UNSET
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from schemas.api import InstanceStats
from schemas.errors import NotFound
from worker.engine import HostEngine
from worker.lifecycle.context import LocalInstance

__all__ = ["InstanceUsageCollector", "instance_stats", "local_instances"]

_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")


def instance_stats(inst: LocalInstance, *, proc: Path = Path("/proc")) -> InstanceStats:
    """The instance's usage now; zeros for what cannot be read (no VMM, a VMM that exited
    while being read)."""
    record = inst.record
    process = inst.process
    cpu_s, rss, vms = _process_usage(proc / str(process.pid)) if process else (0.0, 0, 0)
    rx, tx = _tap_bytes(record.tap) if process and record.tap else (0, 0)
    allocated = record.size_bytes + record.hotplug_bytes
    return InstanceStats(
        instance_id=record.id,
        instance_name=record.name,
        cpu_seconds=cpu_s,
        memory_rss_bytes=rss,
        memory_vms_bytes=vms,
        network_rx_bytes=rx,
        network_tx_bytes=tx,
        allocated_vcpus=record.vcpus,
        allocated_memory_bytes=allocated,
        memory_utilization_ratio=rss / allocated if allocated > 0 else UNSET,
    )


def _process_usage(pid_dir: Path) -> tuple[float, int, int]:
    """(CPU seconds, RSS bytes, VMS bytes) of one process; zeros once it is gone."""
    try:
        stat = (pid_dir / "stat").read_text()
        statm = (pid_dir / "statm").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0, 0, 0
    # After the command name (in parentheses, which may itself hold spaces): field 3 on.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLOCK_TICKS, int(statm[1]) * _PAGE_SIZE, int(statm[0]) * _PAGE_SIZE


def _tap_bytes(tap: str, sys_net: Path = Path("/sys/class/net")) -> tuple[int, int]:
    """(bytes the guest received, bytes it sent) through its TAP."""
    counters = sys_net / tap / "statistics"
    try:
        to_guest = int((counters / "tx_bytes").read_text())
        from_guest = int((counters / "rx_bytes").read_text())
    except (FileNotFoundError, ValueError):
        return 0, 0
    return to_guest, from_guest


def local_instances(engine: HostEngine) -> Iterator[LocalInstance]:
    """The engine's instances, skipping one deleted while being listed."""
    for record in engine.records():
        with contextlib.suppress(NotFound):
            yield engine.instance(record.id)


class InstanceUsageCollector(Collector):
    """Per-instance series, read at scrape time from the same numbers as the stats
    endpoint. Only on the worker's own /metrics (a per-host target): the gateway's keeps
    no per-instance labels."""

    def __init__(self, instances: Callable[[], Iterable[LocalInstance]]) -> None:
        self._instances = instances

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["instance_id", "instance_name"]
        cpu = CounterMetricFamily(
            "vmfleet_instance_cpu_seconds", "CPU time of the instance's VMM", labels=labels
        )
        rss = GaugeMetricFamily(
            "vmfleet_instance_memory_rss_bytes", "Resident memory of the VMM", labels=labels
        )
        vms = GaugeMetricFamily(
            "vmfleet_instance_memory_vms_bytes", "Virtual memory of the VMM", labels=labels
        )
        util = GaugeMetricFamily(
            "vmfleet_instance_memory_utilization_ratio",
            "Resident memory over the memory allocated to the guest",
            labels=labels,
        )
        rx = CounterMetricFamily(
            "vmfleet_instance_network_rx_bytes", "Bytes the guest received", labels=labels
        )
        tx = CounterMetricFamily(
            "vmfleet_instance_network_tx_bytes", "Bytes the guest sent", labels=labels
        )
        for inst in list(self._instances()):
            stats = instance_stats(inst)
            values = [stats.instance_id, stats.instance_name]
            cpu.add_metric(values, stats.cpu_seconds)
            rss.add_metric(values, stats.memory_rss_bytes)
            vms.add_metric(values, stats.memory_vms_bytes)
            ratio = stats.memory_utilization_ratio
            util.add_metric(values, ratio if isinstance(ratio, float) else 0.0)
            rx.add_metric(values, stats.network_rx_bytes)
            tx.add_metric(values, stats.network_tx_bytes)
        yield from (cpu, rss, vms, util, rx, tx)
