"""Facts about this host that the fleet schedules by: CPUs, memory, disk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HostCapacity", "HostLimits", "HostUsage", "read_capacity", "unwritten_bytes"]


@dataclass(frozen=True)
class HostCapacity:
    vcpus: int
    memory_bytes: int
    disk_total_bytes: int
    disk_free_bytes: int


@dataclass(frozen=True)
class HostLimits:
    """What this host accepts: its CPUs and memory times the overcommit ratios. The worker
    refuses a create past them, so placements by several gateways at once cannot
    over-commit the host (the gateway then places the instance elsewhere)."""

    vcpus: float
    memory_bytes: float

    @classmethod
    def of(cls, capacity: HostCapacity, *, cpu_ratio: float, memory_ratio: float) -> HostLimits:
        return cls(capacity.vcpus * cpu_ratio, capacity.memory_bytes * memory_ratio)


@dataclass(frozen=True)
class HostUsage:
    """What this host's instances hold, and how it runs them."""

    vcpus: int = 0
    memory_bytes: int = 0
    instances: int = 0
    accel: str = "tcg"
    #: Disk the instances' sparse overlays and the volumes may still take (see
    #: :func:`unwritten_bytes`); creates in progress count in full.
    disk_promised_bytes: int = 0
    #: Host ports the instances hold, as ``schemas.messages.host_port_key`` names them.
    ports: tuple[str, ...] = ()
    #: Digests and names of the images ready here (placement prefers hosts that have one).
    images: tuple[str, ...] = ()


def read_capacity(data_dir: Path) -> HostCapacity:
    disk = os.statvfs(data_dir)
    return HostCapacity(
        vcpus=os.cpu_count() or 1,
        memory_bytes=_mem_total(),
        disk_total_bytes=disk.f_blocks * disk.f_frsize,
        disk_free_bytes=disk.f_bavail * disk.f_frsize,
    )


def unwritten_bytes(path: Path, size_bytes: int) -> int:
    """How much more a sparse file of ``size_bytes`` may take from the disk: its size less
    the blocks it holds already (all of it while the file does not exist yet)."""
    try:
        held = path.stat().st_blocks * 512
    except FileNotFoundError:
        held = 0
    return max(0, size_bytes - held)


def _mem_total() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
