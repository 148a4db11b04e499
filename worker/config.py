"""What a worker needs to know, built once by the caller and passed in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from natsbus import BusOptions, Layout
from schemas.messages import DEFAULT_CPU_OVERCOMMIT, DEFAULT_MEMORY_OVERCOMMIT
from worker.network import NetworkSettings

__all__ = ["WorkerConfig"]


@dataclass(frozen=True)
class WorkerConfig:
    host_id: str
    data_dir: Path
    bus: BusOptions
    subject_prefix: str = "vmfleet"
    #: VMFLEET_HYPERVISOR: ``auto``, ``qemu`` or ``cloud-hypervisor`` (worker.drivers.select).
    hypervisor: str = "auto"
    #: VMFLEET_CH_BINARY: the Cloud Hypervisor binary (default: ``cloud-hypervisor`` on PATH).
    ch_binary: Path | None = None
    #: VMFLEET_AGENT_BINARY: the guest agent (default: scripts/install.sh's build in the repo).
    agent_binary: Path | None = None
    layout: Layout = field(default_factory=Layout)
    heartbeat_interval_s: float = 5.0
    #: The address other hosts and operators know this host by (shown in GET /hosts).
    address: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    #: `vmfleet dev` owns its VMs and stops them on exit; a production worker leaves them
    #: running for the next worker process to adopt.
    stop_instances_on_exit: bool = False
    #: Where the kernel, initrd and accelerator probe are kept (default: the data dir).
    #: Tests share one across many data dirs.
    assets_dir: Path | None = None
    #: Operator-supplied guest kernel and initrd (VMFLEET_KERNEL / VMFLEET_INITRD).
    kernel: Path | None = None
    initrd: Path | None = None
    #: How instances are networked (``user``: QEMU user mode; ``bridge``: TAPs on a bridge).
    network: NetworkSettings = field(default_factory=NetworkSettings)
    #: Overcommit (VMFLEET_CPU_OVERCOMMIT, VMFLEET_MEMORY_OVERCOMMIT): how many vCPUs per
    #: host CPU, and how much memory per byte of RAM, this host accepts before it refuses
    #: creates (``host_full``). Disk is not overcommitted: see HostEngine._check_room_for.
    cpu_overcommit: float = DEFAULT_CPU_OVERCOMMIT
    memory_overcommit: float = DEFAULT_MEMORY_OVERCOMMIT
    #: A log file over this size is rotated (to ``<name>.1``) once shipped.
    log_max_bytes: int = 50 << 20
    #: VMFLEET_TRANSFER_CACHE_SIZE: disk for snapshots fetched from other hosts
    #: (worker.transfer.HostCache); least recently used ones are evicted above it.
    transfer_cache_bytes: int = 20 << 30
    #: VMFLEET_TEMPLATES: warm templates (worker/templates). Off unless the settings turn it
    #: on (``vmfleet worker`` does by default): a worker made in a test boots cold.
    templates: bool = False
    #: VMFLEET_TEMPLATES_DISK: the disk the host's templates may take together.
    templates_disk_bytes: int = 4 << 30
    #: Registries reached over plain HTTP although not on loopback.
    insecure_registries: frozenset[str] = frozenset()
