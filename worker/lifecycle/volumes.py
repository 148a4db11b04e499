"""attach / detach a volume: hot on a running VM, recorded for the next boot on a stopped one."""

from __future__ import annotations

import contextlib

import anyio

from schemas.api import InstanceState
from schemas.errors import Conflict, HypervisorError, NotFound
from schemas.messages import AttachVolume, DetachVolume, MountSpec
from worker.drivers.base import DiskSpec
from worker.guest.control import GuestControlError, guest_request
from worker.lifecycle.boot import ensure_volume_overlays
from worker.lifecycle.context import LocalInstance, OpContext
from worker.lifecycle.mounts import check_mounts, volume_disks
from worker.states import Op, check_transition

__all__ = ["attach_volume", "detach_volume"]

# Bounds of a hot attach's and detach's steps. An attach (its undo included) and a detach
# each stay under the gateway's wait for a command (55 s): a stuck step fails the command
# with what was stuck, and the instance's next command runs, instead of a 504 while the
# instance's queue waits behind it.
#: The VMM adds a disk (QMP device_add and its block nodes; CH vm.add-disk).
PLUG_S = 10.0
#: The guest sees the disk and mounts it (its init waits up to 20 s for the disk).
MOUNT_S = 25.0
#: A whole attach: the plugs and the mount.
ATTACH_S = 35.0
#: The guest unmounts (a sync first).
UMOUNT_S = 15.0
#: The VMM removes a disk once the guest has released it (QEMU's DEVICE_DELETED).
UNPLUG_S = 15.0
#: Undoing a failed attach: the guest's mount, then the disks.
UNDO_S = 15.0


async def attach_volume(ctx: OpContext, inst: LocalInstance, cmd: AttachVolume) -> None:
    # 1. The state allows it; the mount fits beside the existing ones; the volume is free.
    check_transition(Op.ATTACH_VOLUME, inst.state)
    mount = MountSpec(
        volume_id=cmd.volume_id,
        mount_path=cmd.mount_path,
        readonly=cmd.readonly,
        overlay=cmd.overlay,
        overlay_bytes=cmd.overlay_bytes,
    )
    check_mounts([*inst.record.volumes, mount])
    await _undo_interrupted_attach(ctx, inst, mount)
    ctx.volumes.attach(cmd.volume_id, inst.id, cmd.mount_path, cmd.readonly)
    try:
        # 2. Running: plug the disk(s) in and mount them in the guest.
        if inst.state is InstanceState.RUNNING:
            await _hot_attach(ctx, inst, mount)
        # 3. Either way the record carries it, so every later boot mounts it.
        ctx.save(inst, volumes=[*inst.record.volumes, mount])
    except BaseException:
        ctx.volumes.detach(cmd.volume_id, inst.id)
        raise
    ctx.oplog(inst, "volume attached", volume=cmd.volume_id, path=cmd.mount_path)


async def _undo_interrupted_attach(ctx: OpContext, inst: LocalInstance, mount: MountSpec) -> None:
    """The volume lists this instance but its record does not: an attach of it was cut
    short (the worker died in it, and this is its command again). What of it reached the
    VM is taken out (the guest's mount, the disks on the slots it took), so the attach
    starts clean instead of being refused, or leaving a disk no record knows of."""
    if any(m.volume_id == mount.volume_id for m in inst.record.volumes):
        return  # attached for real: the attach refuses it
    volume = ctx.volumes.get(mount.volume_id)
    if volume is None or all(a.instance_id != inst.id for a in volume.attachments):
        return
    ctx.oplog(inst, "undoing an interrupted attach", volume=mount.volume_id)
    if inst.state is InstanceState.RUNNING and inst.spec is not None and inst.process:
        with contextlib.suppress(HypervisorError):
            await _ask_guest(ctx, inst, f"umount {mount.mount_path}", UMOUNT_S, "umount")
        # Disks the saved spec has (what could not be unplugged stays there: the VMM may
        # hold it still); else the attach died before saving them, on the slots it took.
        in_spec = [d for d in inst.spec.disks if d.volume_id == mount.volume_id]
        for disk in in_spec:
            with contextlib.suppress(HypervisorError):
                await _unplug(ctx, inst, disk)
        if not in_spec:
            disks, _ = volume_disks([mount], ctx.volumes, inst.guest, inst.spec.free_slots())
            for disk in disks:
                with contextlib.suppress(HypervisorError, TimeoutError), anyio.fail_after(UNPLUG_S):
                    await ctx.driver.detach_disk(inst.spec.with_disk(disk), inst.process, disk)
    ctx.volumes.detach(mount.volume_id, inst.id)


async def _hot_attach(ctx: OpContext, inst: LocalInstance, mount: MountSpec) -> None:
    """Plug the volume's disk(s) in, then have the guest mount them; each step bounded.

    A step that fails or overruns its bound fails the attach with what was stuck, after
    what was done is undone: the guest's mount (its init may still finish one the host
    gave up on) and the disks, newest first.
    """
    assert inst.spec is not None and inst.process is not None
    disks, guest_mounts = volume_disks([mount], ctx.volumes, inst.guest, inst.spec.free_slots())
    await ensure_volume_overlays(inst.guest, [mount])
    (gm,) = guest_mounts
    extra = f" {gm.overlay_device}" if gm.overlay_device else ""
    plugged: list[DiskSpec] = []
    mount_sent = False
    try:
        with anyio.fail_after(ATTACH_S):
            for disk in disks:
                await _plug(ctx, inst, disk)
                plugged.append(disk)
            mount_sent = True
            await _ask_guest(
                ctx, inst, f"mount {gm.device} {gm.path} {gm.mode}{extra}", MOUNT_S, "mount"
            )
    except BaseException as exc:
        with anyio.CancelScope(shield=True), anyio.move_on_after(UNDO_S):
            await _undo_attach(ctx, inst, mount, plugged, mount_sent, exc)
        if isinstance(exc, TimeoutError):
            raise HypervisorError(
                f"attaching volume {mount.volume_id} took longer than {ATTACH_S:g}s; "
                "what was done is undone"
            ) from None
        raise
    finally:
        inst.guest.write(inst.guest.vm_spec, inst.spec)


async def _undo_attach(
    ctx: OpContext,
    inst: LocalInstance,
    mount: MountSpec,
    plugged: list[DiskSpec],
    mount_sent: bool,
    cause: BaseException,
) -> None:
    ctx.oplog(inst, "undoing a failed attach", level="WARN", volume=mount.volume_id, error=cause)
    if mount_sent:
        # Queued behind the mount in the guest's init: it runs once that one ends.
        with contextlib.suppress(HypervisorError, TimeoutError):
            await _ask_guest(ctx, inst, f"umount {mount.mount_path}", UMOUNT_S, "umount")
    for disk in reversed(plugged):
        try:
            await _unplug(ctx, inst, disk)
        except (HypervisorError, TimeoutError) as exc:
            ctx.oplog(inst, "could not unplug", level="ERROR", disk=disk.id, error=exc)


async def _plug(ctx: OpContext, inst: LocalInstance, disk: DiskSpec) -> None:
    """Have the VMM add ``disk``; the spec carries it from the moment it may be there."""
    assert inst.spec is not None and inst.process is not None
    inst.spec = inst.spec.with_disk(disk)
    try:
        with anyio.fail_after(PLUG_S):
            await ctx.driver.attach_disk(inst.spec, inst.process, disk)
    except TimeoutError:
        # QEMU may still add it: the spec keeps it, so its slot and names are not reused.
        raise HypervisorError(f"the VMM did not add disk {disk.id} within {PLUG_S:g}s") from None
    except BaseException:
        inst.spec = inst.spec.without_disk(disk.id)  # the VMM refused it: nothing was added
        raise


async def _unplug(ctx: OpContext, inst: LocalInstance, disk: DiskSpec) -> None:
    """Have the VMM remove ``disk`` and wait until the guest let go of it.

    If it does not happen in time the disk stays in the spec: the VMM may still hold it,
    and a new disk on its slot, with its names, would collide with it.
    """
    assert inst.spec is not None and inst.process is not None
    try:
        with anyio.fail_after(UNPLUG_S):
            await ctx.driver.detach_disk(inst.spec, inst.process, disk)
    except TimeoutError:
        raise HypervisorError(
            f"the guest did not release disk {disk.id} within {UNPLUG_S:g}s"
        ) from None
    inst.spec = inst.spec.without_disk(disk.id)
    inst.guest.write(inst.guest.vm_spec, inst.spec)


async def _ask_guest(
    ctx: OpContext, inst: LocalInstance, line: str, bound_s: float, what: str
) -> str:
    assert inst.spec is not None
    try:
        with anyio.fail_after(bound_s):
            return await guest_request(
                ctx.driver.control_socket(inst.spec), line, timeout_s=bound_s
            )
    except TimeoutError:
        raise GuestControlError(f"the guest did not {what} within {bound_s:g}s") from None


async def detach_volume(ctx: OpContext, inst: LocalInstance, cmd: DetachVolume) -> None:
    check_transition(Op.DETACH_VOLUME, inst.state)
    mount = next((m for m in inst.record.volumes if m.volume_id == cmd.volume_id), None)
    if mount is None:
        raise NotFound(f"volume {cmd.volume_id} is not attached to this instance")
    if inst.state is InstanceState.RUNNING:
        await _hot_detach(ctx, inst, mount)
    ctx.save(inst, volumes=[m for m in inst.record.volumes if m.volume_id != cmd.volume_id])
    ctx.volumes.detach(cmd.volume_id, inst.id)
    ctx.oplog(inst, "volume detached", volume=cmd.volume_id)


async def _hot_detach(ctx: OpContext, inst: LocalInstance, mount: MountSpec) -> None:
    """Unmount in the guest, then unplug each of the volume's disks; each step bounded."""
    assert inst.spec is not None and inst.process is not None
    # 1. Unmount first: a disk pulled from under a mounted filesystem loses writes.
    try:
        await _ask_guest(ctx, inst, f"umount {mount.mount_path}", UMOUNT_S, "umount")
    except GuestControlError as exc:
        if "busy" in str(exc).lower():
            raise Conflict(
                f"volume {mount.volume_id} is in use in the guest ({exc}); stop what uses "
                f"{mount.mount_path} and detach again",
                code="volume_in_use",
            ) from None
        if not _not_mounted(str(exc)):
            raise
        # An earlier detach got this far: the volume is unmounted already.
        ctx.oplog(inst, "volume was unmounted already", volume=mount.volume_id)
    # 2. Then unplug each of the volume's disks.
    for disk in [d for d in inst.spec.disks if d.volume_id == mount.volume_id]:
        await _unplug(ctx, inst, disk)


def _not_mounted(error: str) -> bool:
    # busybox umount on a path that is not a mount point: "Invalid argument".
    return "invalid argument" in error.lower() or "not mounted" in error.lower()
