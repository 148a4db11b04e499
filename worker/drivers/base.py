"""The driver interface: what the lifecycle asks of a hypervisor, whichever it is.

A :class:`VmSpec` is everything needed to (re)create the VMM's device model. It is saved
next to a snapshot, because a restore must recreate exactly the devices that were there
when the snapshot was taken, hot-plugged volumes included.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import msgspec

from worker.proc import VmmProcess

__all__ = [
    "AGENT_VSOCK_PORT",
    "AgentEndpoint",
    "Capabilities",
    "DiskSpec",
    "Hypervisor",
    "NicSpec",
    "PortForward",
    "VmSpec",
    "VmState",
]

#: The vsock port the guest agent listens on (Cloud Hypervisor).
AGENT_VSOCK_PORT = 5170


class VmState(enum.StrEnum):
    """What a live VMM reports; hypeman's Created/Running/Paused/Shutdown."""

    CREATED = "Created"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"


class DiskSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One virtio-blk disk. ``serial`` names it inside the guest (/sys/block/vdX/serial),
    which, unlike vdX, does not depend on the order disks were plugged in."""

    id: str
    path: str
    readonly: bool
    serial: str
    #: The hot-plug slot (a PCIe root port) a volume sits on; None for the boot disks.
    slot: int | None = None
    #: The volume this disk belongs to (a volume with an overlay has two disks).
    volume_id: str | None = None
    #: The image format of ``path``: ``raw``, or ``qcow2`` for a copy-on-write layer over
    #: another file (a fork's disks; see worker/resume.py).
    format: str = "raw"


class PortForward(msgspec.Struct, frozen=True, kw_only=True):
    protocol: str
    host_addr: str
    host_port: int
    guest_port: int


class NicSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One virtio-net NIC. ``user``: the VMM's own network stack with port forwards;
    ``tap``: a host TAP device (bridge mode)."""

    id: str
    mac: str
    mode: str = "user"
    tap: str | None = None
    forwards: tuple[PortForward, ...] = ()


class VmSpec(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str
    vcpus: int
    #: All the memory the guest has, from boot (the instance's size + hotplug_size). Specs
    #: saved before this held a ``hotplug_bytes`` field too (decoding skips it): a Cloud
    #: Hypervisor snapshot keeps its own memory config, a QEMU one never had a region.
    memory_bytes: int
    kernel: str
    initrd: str
    cmdline: str
    disks: tuple[DiskSpec, ...]
    serial_log: str
    #: Directory of the VMM's sockets (control API, guest control channel).
    run_dir: str
    accel: str = "tcg"
    hotplug_slots: int = 8
    nics: tuple[NicSpec, ...] = ()
    #: The hypervisor this device model belongs to; specs saved before there was a choice
    #: were all QEMU's. A VM (and its snapshot) stays with the hypervisor that made it.
    hypervisor: str = "qemu"
    #: The guest agent's channel device (QEMU: a virtio-serial port; CH: vsock). False in
    #: specs saved before there was an agent: a restore recreates the devices as they were.
    agent_channel: bool = False
    #: Each disk's bandwidth limit in bytes/s (reads and writes together); 0: unlimited.
    disk_io_bps: int = 0

    def with_disk(self, disk: DiskSpec) -> VmSpec:
        return msgspec.structs.replace(self, disks=(*self.disks, disk))

    def without_disk(self, disk_id: str) -> VmSpec:
        return msgspec.structs.replace(self, disks=tuple(d for d in self.disks if d.id != disk_id))

    def free_slots(self) -> list[int]:
        taken = {d.slot for d in self.disks if d.slot is not None}
        return [s for s in range(1, self.hotplug_slots + 1) if s not in taken]


class AgentEndpoint(msgspec.Struct, frozen=True):
    """Where the host reaches a VM's guest agent: a unix socket, and for a hybrid vsock
    (Cloud Hypervisor) the port to ask for with ``CONNECT <port>``."""

    socket: str
    vsock_port: int | None = None


class Capabilities(msgspec.Struct, frozen=True):
    snapshot: bool
    disk_hotplug: bool


class Hypervisor(Protocol):
    """One implementation per VMM. Methods never leave a VMM process unreaped on failure."""

    name: str
    capabilities: Capabilities

    def control_socket(self, spec: VmSpec) -> Path:
        """The unix socket of the guest control channel."""
        ...

    def api_socket(self, spec: VmSpec) -> Path:
        """The VMM's own control socket (QMP, or Cloud Hypervisor's REST API)."""
        ...

    def agent_endpoint(self, spec: VmSpec) -> AgentEndpoint | None:
        """The guest agent's channel; None for a VM made without one."""
        ...

    async def boot(self, spec: VmSpec, *, vmm_log: Path) -> VmmProcess:
        """Start a VMM and boot the guest; return once the VM runs."""
        ...

    async def state(self, spec: VmSpec, process: VmmProcess) -> VmState: ...

    async def snapshot(self, spec: VmSpec, process: VmmProcess, snapshot_dir: Path) -> None:
        """Pause, save the VM into ``snapshot_dir`` and stop the VMM (reaped on return).
        On failure before the state is saved, the VM is resumed and keeps running."""
        ...

    async def restore(self, spec: VmSpec, snapshot_dir: Path, *, vmm_log: Path) -> VmmProcess:
        """Start a VMM from ``snapshot_dir`` and resume the guest."""
        ...

    async def save_live(
        self,
        spec: VmSpec,
        process: VmmProcess,
        snapshot_dir: Path,
        while_paused: Callable[[], Awaitable[None]],
    ) -> None:
        """Pause, save the VM into ``snapshot_dir`` as :meth:`snapshot` does, run
        ``while_paused`` (the disks are quiet then: a copy of them matches the memory), and
        resume: the VM keeps running. On any failure the VM is resumed too."""
        ...

    async def restore_swapped(
        self, spec: VmSpec, saved_spec: VmSpec, snapshot_dir: Path, *, vmm_log: Path
    ) -> VmmProcess:
        """Start a VMM from ``snapshot_dir`` (saved with ``saved_spec``) with ``spec``'s files
        in place of the saved ones (the same device model: worker/resume.py checks it), make
        the guest see each disk's own size, and resume the guest."""
        ...

    async def resume(self, spec: VmSpec, process: VmmProcess) -> None:
        """Continue a paused VM."""
        ...

    async def power_off(self, spec: VmSpec, process: VmmProcess, timeout_s: float) -> bool:
        """Ask the VMM to power the guest off (ACPI); True if it exited within the timeout."""
        ...

    async def attach_disk(self, spec: VmSpec, process: VmmProcess, disk: DiskSpec) -> None: ...

    async def detach_disk(self, spec: VmSpec, process: VmmProcess, disk: DiskSpec) -> None: ...
