"""What a host has promised: the vCPUs, memory, disk and host ports its instances hold.

One account per host, shared by the real engine and the benchmark's simulated host, so
that both refuse a create past the host's limits with the same ``host_full`` error and
report the same usage in their heartbeat. The account reads the instance records through
the callables it is given; it keeps only the creates under way, which count against the
host from the moment they pass the check until their instance is in the table, so that
creates running side by side (sent by several gateways) cannot together over-commit it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from schemas.errors import NoCapacity
from schemas.messages import Create, InstanceRecord, host_port_key
from worker.host import HostLimits, HostUsage
from worker.states import HOLDS_VMM

__all__ = ["CapacityAccount"]


@dataclass
class CapacityAccount:
    host_id: str
    #: The host's limits; None: no limit (tests of one operation).
    limits: Callable[[], HostLimits | None]
    #: The records of the instances on the host.
    records: Callable[[], Iterable[InstanceRecord]]
    #: Free bytes on the disk that holds the instances and volumes.
    disk_free: Callable[[], int]
    #: What the sparse disks of the instances and volumes here may still take.
    disk_unwritten: Callable[[], int]
    #: instance id -> its create, while under way.
    creating: dict[str, Create] = field(default_factory=dict)

    def check_room_for(self, cmd: Create) -> None:
        """Refuse (503 ``host_full``) a create that would take the host past its vCPU or
        memory limit, or promise more disk than is free; the gateway then places it on
        another host. Disk is never overcommitted."""
        limits = self.limits()
        if limits is None:
            return
        held_vcpus, held_memory = self.held()
        vcpus = held_vcpus + cmd.vcpus
        memory = held_memory + cmd.size_bytes + cmd.hotplug_bytes
        disk = self.disk_promised() + cmd.disk_bytes
        disk_free = self.disk_free()
        if vcpus > limits.vcpus or memory > limits.memory_bytes or disk > disk_free:
            raise NoCapacity(
                f"host {self.host_id} is full: {vcpus} of {limits.vcpus:g} vCPUs, "
                f"{memory >> 20} of {int(limits.memory_bytes) >> 20} MiB of memory, and "
                f"{disk >> 20} MiB of disk of {disk_free >> 20} MiB free would be in use",
                code="host_full",
            )

    @contextlib.contextmanager
    def reserving(self, cmd: Create) -> Iterator[None]:
        """Count ``cmd`` against the host while the block runs (its create is under way);
        the caller puts the instance in its table as the block ends."""
        self.creating[cmd.instance_id] = cmd
        try:
            yield
        finally:
            del self.creating[cmd.instance_id]

    def held(self) -> tuple[int, int]:
        """vCPUs and memory (size + hotplug) of the VMs that have a VMM, as hypeman counts
        them, and of the creates under way."""
        live = [r for r in self.records() if r.state in HOLDS_VMM]
        creating = list(self.creating.values())
        return (
            sum(r.vcpus for r in live) + sum(c.vcpus for c in creating),
            sum(r.size_bytes + r.hotplug_bytes for r in live)
            + sum(c.size_bytes + c.hotplug_bytes for c in creating),
        )

    def disk_promised(self) -> int:
        """What the sparse disks here may still take, and the creates under way in full."""
        return self.disk_unwritten() + sum(cmd.disk_bytes for cmd in self.creating.values())

    def ports_taken(self) -> set[tuple[str, int]]:
        """Host ports held by this host's instances, whatever their state, and by the
        creates under way."""
        mappings = [m for record in self.records() for m in record.port_mappings]
        mappings += [m for cmd in self.creating.values() for m in cmd.port_mappings]
        return {(str(m.protocol or "tcp"), m.host_port) for m in mappings}

    def usage(self, *, accel: str, images: tuple[str, ...]) -> HostUsage:
        """What placement must count (the heartbeat carries it): vCPUs and memory of the
        VMs that have a VMM and of the creates under way, the disk the instances and
        volumes may still take, the host ports held, and the images ready here."""
        vcpus, memory = self.held()
        return HostUsage(
            vcpus=vcpus,
            memory_bytes=memory,
            instances=sum(1 for _ in self.records()) + len(self.creating),
            accel=accel,
            disk_promised_bytes=self.disk_promised(),
            ports=tuple(sorted(host_port_key(port, proto) for proto, port in self.ports_taken())),
            images=images,
        )
