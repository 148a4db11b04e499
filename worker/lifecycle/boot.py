"""Booting an instance's VM from its record: shared by create and start.

:func:`boot_to_running` is the one place an instance goes Created -> Initializing ->
Running; :func:`wait_until_ready` is the step between the last two.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import anyio

from schemas.clock import utc_now
from schemas.errors import BadRequest, HypervisorError
from schemas.messages import MountSpec
from worker.drivers.base import DiskSpec, VmSpec
from worker.guest import BOOT_ARGS, GuestConfig, build_config_disk, merge_env
from worker.images import ImageInfo
from worker.lifecycle.context import LocalInstance, OpContext, Walk
from worker.lifecycle.exits import read_exit_marker, record_vmm_exit
from worker.lifecycle.mounts import volume_disks
from worker.lifecycle.network import guest_network, nics, plug
from worker.lifecycle.phases import CreatePhases, init_uptime_s
from worker.snapshots.layers import instance_disk
from worker.storage import GuestDir, make_sparse_ext4

__all__ = [
    "boot_to_running",
    "boot_vm",
    "ensure_volume_overlays",
    "guest_config",
    "run_until_ready",
    "vm_spec",
    "wait_until_ready",
]

#: The kernel command line: the kernel's own words (BOOT_ARGS), then the guest control
#: channel on the second UART.
CMDLINE = f"{BOOT_ARGS} vmfleet.ctl=ttyS1"


async def ensure_volume_overlays(guest: GuestDir, mounts: Iterable[MountSpec]) -> None:
    """The per-instance writable layer of each overlay volume mount (kept across restarts)."""
    for mount in mounts:
        path = guest.volume_overlay(mount.volume_id)
        if mount.overlay and not path.exists():
            path.parent.mkdir(exist_ok=True)
            await make_sparse_ext4(path, mount.overlay_bytes)


def guest_config(
    ctx: OpContext, inst: LocalInstance, image: ImageInfo, mounts: list[object]
) -> GuestConfig:
    record = inst.record
    entrypoint = tuple(record.entrypoint if record.entrypoint is not None else image.entrypoint)
    cmd = tuple(record.cmd if record.cmd is not None else image.cmd)
    if not entrypoint and not cmd:
        raise BadRequest(
            f"image {record.image} has neither entrypoint nor cmd", code="invalid_image"
        )
    return GuestConfig(
        entrypoint=entrypoint,
        cmd=cmd,
        workdir=image.working_dir or "/",
        env=merge_env(image.env, record.env),
        volume_mounts=tuple(mounts),  # type: ignore[arg-type]
        network=guest_network(ctx, inst),
        hostname=record.name,
    )


def vm_spec(
    ctx: OpContext, inst: LocalInstance, image: ImageInfo, volumes: list[DiskSpec]
) -> VmSpec:
    guest = inst.guest
    boot_disks = (
        DiskSpec(id="root", path=str(image.disk), readonly=True, serial="vmfleet-root"),
        _overlay_disk(guest),
        DiskSpec(id="config", path=str(guest.config_disk), readonly=True, serial="vmfleet-config"),
    )
    return VmSpec(
        instance_id=inst.id,
        vcpus=inst.record.vcpus,
        # The guest has size + hotplug_size from boot, the memory hypeman's guests end up
        # with once it plugs the whole hot-plug region right after boot (vmfleet has no
        # resize operation that would plug it later, so a region left unplugged would be
        # memory counted and never given). docs/api.md, "Memory".
        memory_bytes=inst.record.size_bytes + inst.record.hotplug_bytes,
        kernel=str(ctx.boot.kernel),
        initrd=str(ctx.boot.initrd),
        cmdline=CMDLINE,
        disks=(*boot_disks, *volumes),
        serial_log=str(guest.app_log),
        run_dir=str(guest.run_dir),
        accel=ctx.boot.accel,
        nics=nics(ctx, inst),
        hypervisor=inst.record.hypervisor.value,
        agent_channel=True,
        disk_io_bps=inst.record.disk_io_bps,
    )


def _overlay_disk(guest: GuestDir) -> DiskSpec:
    """The writable layer: the instance's own overlay, or the qcow2 layer a fork or a
    snapshot restore put over a snapshot's disk (worker.snapshots.layers)."""
    layer = instance_disk(guest.root, "overlay")
    path, fmt = layer if layer is not None else (guest.overlay, "raw")
    return DiskSpec(
        id="overlay", path=str(path), readonly=False, serial="vmfleet-overlay", format=fmt
    )


async def boot_vm(
    ctx: OpContext, inst: LocalInstance, image: ImageInfo, phases: CreatePhases | None = None
) -> None:
    """Write the config disk for the record as it is now, plug the NIC (bridge mode),
    then start the VMM (``phases``: a create's steps, timed)."""
    phases = phases if phases is not None else CreatePhases()
    with phases.timing("disks"):
        await ensure_volume_overlays(inst.guest, inst.record.volumes)
        disks, mounts = volume_disks(inst.record.volumes, ctx.volumes, inst.guest)
        config = guest_config(ctx, inst, image, list(mounts))
        await build_config_disk(inst.guest.config_disk, config, agent=ctx.boot.agent)
    spec = vm_spec(ctx, inst, image, disks)
    inst.guest.write(inst.guest.vm_spec, spec)
    inst.app_status = None
    with phases.timing("vmm"):
        await plug(ctx, inst)
        inst.process = await ctx.driver.boot(spec, vmm_log=inst.guest.vmm_log)
    inst.spec = spec
    inst.guest.write_pid(inst.process.pid)
    ctx.oplog(inst, "VMM started", pid=inst.process.pid, accel=spec.accel)


async def boot_to_running(
    ctx: OpContext, walk: Walk, image: ImageInfo, phases: CreatePhases | None = None
) -> None:
    """From Created: boot the VM (Initializing once its VMM runs), then Running once the
    guest is ready. A program that ends before that (a short job) leaves the instance
    Stopped with its exit code. A failure leaves the instance where it was for the caller
    to undo. ``phases``: a create's steps, timed (the guest's wait split at its init)."""
    phases = phases if phases is not None else CreatePhases()
    await boot_vm(ctx, walk.inst, image, phases)
    await run_until_ready(ctx, walk, phases)


async def run_until_ready(ctx: OpContext, walk: Walk, phases: CreatePhases) -> None:
    """From Created with the VMM just started (booted, or resumed from a warm template):
    Initializing, then Running once the guest is ready (or Stopped: a short job)."""
    inst = walk.inst
    walk.advance(started_at=None)  # Initializing: the VMM runs the guest
    waiting = time.monotonic()
    ready = await wait_until_ready(ctx, inst)
    phases.split_guest_wait(time.monotonic() - waiting, init_uptime_s(inst.guest.app_log))
    if ready:
        walk.advance(started_at=utc_now())  # Running
        return
    assert inst.process is not None
    status = inst.process.returncode
    if read_exit_marker(inst.guest.app_log) is None:
        raise HypervisorError(
            f"the VM exited during boot (VMM exit status {status}); see the vmm and app logs"
        )
    record_vmm_exit(ctx, inst, status)
    ctx.oplog(inst, "the app ended before the guest was ready", exit_code=inst.record.exit_code)


async def wait_until_ready(ctx: OpContext, inst: LocalInstance) -> bool:
    """True once the guest counts as ready, the step from Initializing to Running: its
    agent answered the hub's handshake (the init's control channel is asked for on first
    use, each request waiting for it). False when the VMM exited first (the app ended and
    the guest powered off). AgentUnavailable if the agent does not answer within
    ``guest_ready_s``; True at once when there is no hub (tests of one operation) or this
    host's guests have no agent."""
    agent, process = ctx.agent, inst.process
    if agent is None or inst.spec is None or process is None:
        return True
    exited = False
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch_exit() -> None:
            nonlocal exited
            await process.wait()
            exited = True
            tg.cancel_scope.cancel()

        tg.start_soon(watch_exit)
        try:
            await agent.wait_ready(inst.id, ctx.timeouts.guest_ready_s)
        except Exception as exc:
            failure = exc
        tg.cancel_scope.cancel()
    if exited or (failure is not None and await process.wait_for(_EXIT_GRACE_S)):
        return False  # an agent lost with its VM: the VM's exit is the news
    if failure is not None:
        raise failure
    return True


#: How long a lost agent's VMM gets to exit before the loss counts as the agent's failure.
_EXIT_GRACE_S = 3.0
