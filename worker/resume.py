"""Resume a saved VM with other disks under it and a new identity: the one mechanism behind
warm-template starts (worker/templates/) and fork.

A saved VM is a device model (its :class:`VmSpec`) and the VMM's saved state (memory and
devices, no disk contents). :func:`resume_saved_vm` starts a VMM from that state with the
new instance's files in place of the saved ones (the driver's ``restore_swapped``: same
devices, other files, each disk's size made known to the guest), then tells the guest over
its control channel who it is now: the clock, fresh random bytes for its RNG, its MAC,
hostname and network. A guest whose init waits for its instance config (a template) then
boots on as a cold boot does from mounting its disks; a running guest (a fork) takes the new
identity in place and its app goes on.

Decisions (What / Why):
- The device model must be the saved one, only the files (and NIC backends) differ: QEMU
  loads device state into the devices of the command line, so any other device tree is a
  broken guest. :func:`check_same_device_model` refuses before a VMM starts.
- The new MAC goes on the command line and to the guest: QEMU's virtio-net state carries
  the saved MAC, and the guest's ``ip link set address`` is what changes the device's.
- The RNG seed and the clock are made here, at the last moment, never stored: two resumes
  of one saved VM never share them.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path

import anyio
import msgspec

from schemas.clock import utc_now
from schemas.errors import HypervisorError
from worker.drivers.base import DiskSpec, Hypervisor, NicSpec, VmSpec
from worker.guest import GuestNetwork
from worker.guest.control import GuestControlError, guest_request
from worker.proc import VmmProcess

__all__ = [
    "GuestIdentity",
    "ResumeError",
    "SavedVm",
    "check_same_device_model",
    "identity_request",
    "resume_saved_vm",
    "swap_spec",
    "tell_identity",
]

#: Bytes of fresh randomness given to every resumed guest.
SEED_BYTES = 32


class ResumeError(HypervisorError):
    """The saved VM cannot be resumed with these files, or the guest did not take its new
    identity."""


class SavedVm(msgspec.Struct, frozen=True, kw_only=True):
    """A VM saved by ``driver.snapshot(spec, process, directory)``, with that spec."""

    spec: VmSpec
    directory: str

    @classmethod
    def load(cls, directory: Path) -> SavedVm:
        """The standby layout: the driver's files and ``vm.json`` (the VmSpec) in one dir."""
        try:
            spec = msgspec.json.decode((directory / "vm.json").read_bytes(), type=VmSpec)
        except (OSError, msgspec.DecodeError) as exc:
            raise ResumeError(f"no saved VM in {directory}: {exc}") from exc
        return cls(spec=spec, directory=str(directory))


class GuestIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """Who the resumed guest is. The clock and the RNG seed are made at resume."""

    hostname: str
    #: The NIC's new MAC; None: the VM has no NIC.
    mac: str | None = None
    network: GuestNetwork = msgspec.field(default_factory=GuestNetwork)


def swap_spec(
    saved: VmSpec,
    *,
    instance_id: str,
    run_dir: str,
    serial_log: str,
    disks: Mapping[str, DiskSpec | str],
    nics: tuple[NicSpec, ...] | None = None,
    disk_io_bps: int | None = None,
) -> VmSpec:
    """The saved device model with a new instance's files. ``disks`` by DiskSpec.id: a new
    path, or a whole DiskSpec (same id); a saved disk not named keeps its file (a shared
    read-only image). ``nics``: the new NICs (MAC, TAP, port forwards), as many as the
    saved ones."""
    unknown = set(disks) - {d.id for d in saved.disks}
    if unknown:
        raise ResumeError(f"the saved VM has no disk {', '.join(sorted(unknown))}")
    swapped: list[DiskSpec] = []
    for disk in saved.disks:
        new = disks.get(disk.id, disk)
        swapped.append(msgspec.structs.replace(disk, path=new) if isinstance(new, str) else new)
    spec = msgspec.structs.replace(
        saved,
        instance_id=instance_id,
        run_dir=run_dir,
        serial_log=serial_log,
        disks=tuple(swapped),
        nics=saved.nics if nics is None else nics,
        disk_io_bps=saved.disk_io_bps if disk_io_bps is None else disk_io_bps,
    )
    check_same_device_model(saved, spec)
    return spec


def _device_model(spec: VmSpec) -> tuple[object, ...]:
    """What the guest's devices (and the VMM's saved state of them) depend on: everything
    but the files behind the disks, the NICs' MACs and backends, and where logs and sockets
    go."""
    return (
        spec.hypervisor,
        spec.vcpus,
        spec.memory_bytes,
        spec.kernel,
        spec.initrd,
        spec.cmdline,
        spec.accel,
        spec.hotplug_slots,
        spec.agent_channel,
        tuple((d.id, d.serial, d.readonly, d.slot) for d in spec.disks),
        # NIC backends (user mode or a TAP) are not in the saved state: only the NICs count.
        tuple(n.id for n in spec.nics),
    )


def check_same_device_model(saved: VmSpec, spec: VmSpec) -> None:
    if _device_model(saved) != _device_model(spec):
        raise ResumeError(
            "the saved VM's devices differ from the new instance's "
            f"(saved {_device_model(saved)}, new {_device_model(spec)})"
        )


def identity_request(identity: GuestIdentity, *, epoch: int, seed: bytes) -> str:
    """The control channel line (worker/guest/init.sh, ``identity``):
    ``identity EPOCH SEED_HEX MAC|- HOSTNAME off|dhcp|static [IP CIDR GW|- [DNS...]]``."""
    net = identity.network
    words = [
        "identity",
        str(epoch),
        seed.hex(),
        identity.mac or "-",
        _word(identity.hostname) or "-",
    ]
    if not net.enabled:
        words.append("off")
    elif net.mode == "dhcp":
        words.append("dhcp")
    else:
        words += ["static", net.ip or "-", str(net.cidr or 24), net.gw or "-", *net.dns]
    return " ".join(words)


def _word(text: str) -> str:
    """One word on the control channel (a hostname never has spaces; be sure of it)."""
    return "".join(c for c in text if c.isalnum() or c in "-.")


async def resume_saved_vm(
    driver: Hypervisor,
    saved: SavedVm,
    spec: VmSpec,
    identity: GuestIdentity,
    *,
    vmm_log: Path,
    guest_timeout_s: float = 30.0,
) -> VmmProcess:
    """Start the saved VM with ``spec``'s files and tell the guest its identity; return its
    VMM with the guest running. On any failure the VMM is killed and reaped."""
    check_same_device_model(saved.spec, spec)
    process = await driver.restore_swapped(spec, saved.spec, Path(saved.directory), vmm_log=vmm_log)
    try:
        await tell_identity(driver, spec, identity, timeout_s=guest_timeout_s)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await process.kill_and_reap()
        raise
    return process


async def tell_identity(
    driver: Hypervisor, spec: VmSpec, identity: GuestIdentity, *, timeout_s: float
) -> None:
    """Step 3 alone: the guest's clock, a fresh RNG seed, MAC, hostname and network, for a
    guest already running on its VMM."""
    line = identity_request(
        identity, epoch=int(utc_now().timestamp()), seed=secrets.token_bytes(SEED_BYTES)
    )
    try:
        await guest_request(driver.control_socket(spec), line, timeout_s=timeout_s)
    except GuestControlError as exc:
        raise ResumeError(f"the resumed guest did not take its identity: {exc}") from exc
