"""attach / detach a volume: hot on a running VM, recorded for the next boot on a stopped one."""

from __future__ import annotations

import contextlib

import anyio

from schemas.api import InstanceState
from schemas.errors import HypervisorError, NotFound
from schemas.messages import AttachVolume, DetachVolume, MountSpec
from worker.guest.control import guest_request
from worker.lifecycle.boot import ensure_volume_overlays
from worker.lifecycle.context import LocalInstance, OpContext
from worker.lifecycle.mounts import check_mounts, volume_disks
from worker.states import Op, check_transition

__all__ = ["attach_volume", "detach_volume"]


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
            await guest_request(
                ctx.driver.control_socket(inst.spec),
                f"umount {mount.mount_path}",
                timeout_s=ctx.timeouts.mount_s,
            )
        disks, _ = volume_disks([mount], ctx.volumes, inst.guest, inst.spec.free_slots())
        for disk in disks:
            with contextlib.suppress(HypervisorError):
                await ctx.driver.detach_disk(inst.spec.with_disk(disk), inst.process, disk)
    ctx.volumes.detach(mount.volume_id, inst.id)


async def _hot_attach(ctx: OpContext, inst: LocalInstance, mount: MountSpec) -> None:
    assert inst.spec is not None and inst.process is not None
    spec = inst.spec
    disks, guest_mounts = volume_disks([mount], ctx.volumes, inst.guest, spec.free_slots())
    await ensure_volume_overlays(inst.guest, [mount])
    plugged = []
    try:
        for disk in disks:
            await ctx.driver.attach_disk(spec, inst.process, disk)
            plugged.append(disk)
            inst.spec = spec = spec.with_disk(disk)
        (gm,) = guest_mounts
        extra = f" {gm.overlay_device}" if gm.overlay_device else ""
        await guest_request(
            ctx.driver.control_socket(spec),
            f"mount {gm.device} {gm.path} {gm.mode}{extra}",
            timeout_s=ctx.timeouts.mount_s,
        )
    except BaseException:
        with anyio.CancelScope(shield=True):
            for disk in reversed(plugged):
                with contextlib.suppress(Exception):
                    await ctx.driver.detach_disk(spec, inst.process, disk)
                inst.spec = spec = spec.without_disk(disk.id)
        raise
    finally:
        inst.guest.write(inst.guest.vm_spec, inst.spec)


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
    assert inst.spec is not None and inst.process is not None
    spec = inst.spec
    # 1. Unmount first: a disk pulled from under a mounted filesystem loses writes.
    await guest_request(
        ctx.driver.control_socket(spec),
        f"umount {mount.mount_path}",
        timeout_s=ctx.timeouts.mount_s,
    )
    # 2. Then unplug each of the volume's disks.
    for disk in [d for d in spec.disks if d.volume_id == mount.volume_id]:
        await ctx.driver.detach_disk(spec, inst.process, disk)
        inst.spec = spec = spec.without_disk(disk.id)
        inst.guest.write(inst.guest.vm_spec, spec)
