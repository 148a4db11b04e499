"""The host record: written at start and every few seconds, so a dead host ages out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime

import anyio
from anyio.abc import TaskStatus
from nats.js.kv import KeyValue

from schemas.api import Hypervisor
from schemas.clock import utc_now
from schemas.codec import encode
from schemas.messages import HostRecord
from worker.config import WorkerConfig
from worker.host import HostCapacity, HostUsage, read_capacity

__all__ = ["heartbeat_loop", "host_record"]

log = logging.getLogger(__name__)

VERSION = "0.1.0"


def host_record(
    config: WorkerConfig,
    started_at: datetime,
    usage: HostUsage,
    hypervisors: Sequence[Hypervisor] = (Hypervisor.QEMU,),
    capacity: HostCapacity | None = None,
    problem: str = "",
) -> HostRecord:
    """``hypervisors``: what new instances here boot under (placement matches requests
    against it), not VMFLEET_HYPERVISOR's ``auto``. ``capacity``: the host's, read from
    its data disk unless given (the benchmark's simulated hosts give theirs)."""
    capacity = capacity or read_capacity(config.data_dir)
    return HostRecord(
        id=config.host_id,
        address=config.address or config.host_id,
        hypervisors=list(hypervisors),
        vcpus_total=capacity.vcpus,
        accel="kvm" if usage.accel == "kvm" else "tcg",
        vcpus_allocated=usage.vcpus,
        memory_total_bytes=capacity.memory_bytes,
        memory_allocated_bytes=usage.memory_bytes,
        disk_total_bytes=capacity.disk_total_bytes,
        disk_free_bytes=capacity.disk_free_bytes,
        disk_promised_bytes=usage.disk_promised_bytes,
        instances=usage.instances,
        version=VERSION,
        labels=dict(config.labels),
        ports=list(usage.ports),
        images=list(usage.images),
        network_mode=config.network.mode,
        started_at=started_at,
        heartbeat_at=utc_now(),
        problem=problem,
    )


async def heartbeat_loop(
    hosts: KeyValue,
    config: WorkerConfig,
    usage: Callable[[], HostUsage] = HostUsage,
    *,
    hypervisors: Sequence[Hypervisor] = (Hypervisor.QEMU,),
    capacity: HostCapacity | None = None,
    problem: Callable[[], str] = lambda: "",
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Put the host record now, then every interval; a failed put is retried next beat."""
    started_at = utc_now()

    async def beat() -> None:
        record = host_record(config, started_at, usage(), hypervisors, capacity, problem())
        await hosts.put(config.host_id, encode(record))

    await beat()
    task_status.started()
    while True:
        await anyio.sleep(config.heartbeat_interval_s)
        try:
            with anyio.fail_after(config.heartbeat_interval_s):
                await beat()
        except Exception as exc:  # NATS down: keep beating, the record ages out meanwhile
            log.warning("heartbeat of %s failed: %s", config.host_id, exc)
