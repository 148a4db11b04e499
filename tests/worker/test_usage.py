"""What an instance uses, as the stats endpoint and the worker's /metrics read it."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from tests.support.gateway import instance_record
from worker.lifecycle.context import LocalInstance
from worker.proc import VmmProcess
from worker.storage import GuestDir
from worker.usage import InstanceUsageCollector, instance_stats

MIB = 1 << 20


def _instance(tmp_path: Path, process: VmmProcess | None) -> LocalInstance:
    record = instance_record("i" * 24, "web", "h1", size_bytes=512 * MIB, vcpus=3)
    return LocalInstance(record=record, guest=GuestDir(tmp_path / record.id), process=process)


def test_an_instance_without_a_vmm_uses_nothing(tmp_path: Path) -> None:
    stats = instance_stats(_instance(tmp_path, None))
    assert (stats.cpu_seconds, stats.memory_rss_bytes, stats.memory_vms_bytes) == (0, 0, 0)
    assert (stats.network_rx_bytes, stats.network_tx_bytes) == (0, 0)
    assert (stats.allocated_vcpus, stats.allocated_memory_bytes) == (3, 512 * MIB)
    assert stats.memory_utilization_ratio == 0


def test_a_live_process_is_read_from_proc_and_exported(tmp_path: Path) -> None:
    # This test's own process stands in for a VMM: it has CPU time and memory.
    inst = _instance(tmp_path, VmmProcess(os.getpid(), is_child=False))
    stats = instance_stats(inst)
    assert stats.cpu_seconds > 0 and stats.memory_vms_bytes >= stats.memory_rss_bytes > 0
    registry = CollectorRegistry()
    InstanceUsageCollector(lambda: [inst]).register(registry)
    text = generate_latest(registry).decode()
    labels = f'instance_id="{inst.id}",instance_name="web"'
    assert f"vmfleet_instance_cpu_seconds_total{{{labels}}}" in text
    assert f"vmfleet_instance_memory_rss_bytes{{{labels}}}" in text
