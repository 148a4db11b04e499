"""A create that is a fork: a new instance made from a snapshot on this host.

The new instance has its own id, name, MAC, address and hostname; its disks are qcow2
layers over hard links of the snapshot's (``layers``), so ten forks take ten small layers,
not ten copies. A snapshot of kind Standby is resumed through ``worker.resume`` (the one
mechanism that also starts warm templates): the snapshot's memory file is read by each
fork's VMM, never copied, and the guest is told its new identity and fresh RNG bytes as it
resumes. A snapshot of kind Stopped boots from its disks.

Everything is checked before a VMM starts (the snapshot is here and complete, this host's
VMM and kernel are the ones it was taken under, the host has room), and a failure at any
later step removes the instance's directory, address and name as a failed create does.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anyio
import msgspec

from schemas.clock import utc_now
from schemas.errors import Conflict
from schemas.messages import Create
from schemas.snapshots import SnapshotKind, SnapshotManifest, TargetState
from worker.capacity import CapacityAccount
from worker.lifecycle.boot import boot_to_running
from worker.lifecycle.context import LocalInstance, OpContext, Walk
from worker.lifecycle.create import check_create, initial_record
from worker.lifecycle.network import guest_network, nics, plug, release_network, take_address
from worker.resume import GuestIdentity, SavedVm, resume_saved_vm, swap_spec
from worker.snapshots.capture import snapshot_store
from worker.snapshots.identity import check_compatible
from worker.snapshots.layers import link_chain, new_top_layer
from worker.snapshots.restore import reach_target_state
from worker.snapshots.store import VM_DIR, copy_cow, link_tree
from worker.states import Op
from worker.transfer.names import SHIPPED_DISKS

__all__ = ["fork_instance"]

_SAVED_DIR = "saved"


async def fork_instance(ctx: OpContext, cmd: Create, capacity: CapacityAccount) -> LocalInstance:
    assert cmd.fork is not None
    manifest = snapshot_store(ctx).require(cmd.fork.snapshot_id)
    _check_forkable(manifest)
    check_create(ctx, cmd, capacity)
    with capacity.reserving(cmd):
        return await _make(ctx, cmd, manifest)


def _check_forkable(manifest: SnapshotManifest) -> None:
    if manifest.source.volume_ids:
        raise Conflict(
            f"snapshot {manifest.id} was taken with volumes attached "
            f"({', '.join(manifest.source.volume_ids)}); a fork cannot share them: detach "
            "them and take a new snapshot",
            code="not_supported",
        )


async def _make(ctx: OpContext, cmd: Create, manifest: SnapshotManifest) -> LocalInstance:
    guest = ctx.storage.create_guest(cmd.instance_id)
    inst = LocalInstance(record=initial_record(ctx, cmd), guest=guest)
    walk = ctx.walk(inst, Op.CREATE)
    try:
        guest.write(guest.metadata, inst.record)
        ctx.oplog(inst, "fork started", snapshot=manifest.id, source=manifest.source.id)
        ctx.save(inst, image_digest=manifest.source.image_digest)
        take_address(ctx, inst)
        if manifest.kind is SnapshotKind.STANDBY:
            await _resume(ctx, walk, manifest)
        else:
            await _boot(ctx, walk, manifest)
        await reach_target_state(ctx, inst, _target_state(cmd, manifest), cmd.id)
        ctx.oplog(inst, "fork finished", snapshot=manifest.id, state=inst.state.value)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _undo(ctx, inst)
        raise
    finally:
        shutil.rmtree(guest.root / _SAVED_DIR, ignore_errors=True)
    return inst


async def _resume(ctx: OpContext, walk: Walk, manifest: SnapshotManifest) -> None:
    """Resume the snapshot's memory with this instance's disks, NIC and identity."""
    inst, guest = walk.inst, walk.inst.guest
    directory = snapshot_store(ctx).directory(manifest.id)
    saved_dir = guest.root / _SAVED_DIR
    link_tree(directory / VM_DIR, saved_dir)  # the snapshot may be deleted meanwhile
    saved = SavedVm.load(saved_dir)
    await check_compatible(ctx.driver, manifest, saved.spec, ctx.boot.kernel)
    disks = await _fork_disks(ctx, inst, manifest, directory)
    spec = swap_spec(
        saved.spec,
        instance_id=inst.id,
        run_dir=str(guest.run_dir),
        serial_log=str(guest.app_log),
        disks={
            d.id: msgspec.structs.replace(d, path=disks[d.id][0], format=disks[d.id][1])
            for d in saved.spec.disks
            if d.id in disks
        },
        nics=nics(ctx, inst),
    )
    guest.write(guest.vm_spec, spec)
    await plug(ctx, inst)
    identity = GuestIdentity(
        hostname=inst.record.name,
        mac=inst.record.mac if inst.record.network_enabled else None,
        network=guest_network(ctx, inst),
    )
    inst.process = await resume_saved_vm(
        ctx.driver,
        saved,
        spec,
        identity,
        vmm_log=guest.vmm_log,
        guest_timeout_s=ctx.timeouts.guest_ready_s,
    )
    inst.spec = spec
    guest.write_pid(inst.process.pid)
    ctx.oplog(inst, "VMM resumed from snapshot", pid=inst.process.pid, snapshot=manifest.id)
    now = utc_now()
    walk.advance(started_at=None)  # Initializing: the VMM runs the guest
    walk.advance(started_at=now)  # Running: the guest answered with its new identity


async def _boot(ctx: OpContext, walk: Walk, manifest: SnapshotManifest) -> None:
    """A snapshot of kind Stopped: boot the image over the snapshot's disks."""
    inst = walk.inst
    directory = snapshot_store(ctx).directory(manifest.id)
    await _fork_disks(ctx, inst, manifest, directory)
    image = await ctx.pull_image(inst)
    await boot_to_running(ctx, walk, image)


async def _fork_disks(
    ctx: OpContext, inst: LocalInstance, manifest: SnapshotManifest, directory: Path
) -> dict[str, tuple[str, str]]:
    """Each disk of the snapshot for the new instance, by disk id: its path and format (a
    writable qcow2 layer over the snapshot's, a copy of the config disk, the image's)."""
    guest = inst.guest
    found: dict[str, tuple[str, str]] = {}
    for disk in manifest.disks:
        if disk.file is None:
            found[disk.id] = (await _host_disk(ctx, inst, disk.id, directory), "raw")
        elif disk.id == "config":
            # The config disk is the instance's own (a cold start rewrites it): a copy.
            await copy_cow(directory / disk.file, guest.config_disk)
            found[disk.id] = (str(guest.config_disk), "raw")
        else:
            base = link_chain(directory / disk.file, guest.root / "disks" / manifest.id)
            layer = new_top_layer(guest.root / "disks", disk.id, inst.id, base)
            found[disk.id] = (str(layer), "qcow2")
    return found


async def _host_disk(ctx: OpContext, inst: LocalInstance, disk_id: str, directory: Path) -> str:
    """A disk this host provides: the image's rootfs (pulled if this host lacks it); for a
    snapshot fetched from another host, the disk of that host it came with (worker.transfer
    .snapshots: each host's disk of an image is other bytes), hard-linked as the fork's."""
    if disk_id != "root":
        raise Conflict(f"the snapshot's disk {disk_id} is not on this host", code="not_supported")
    shipped = directory / SHIPPED_DISKS / "root.ext4"
    if shipped.exists():
        own = inst.guest.root / "disks" / "root.ext4"
        own.parent.mkdir(parents=True, exist_ok=True)
        own.unlink(missing_ok=True)
        os.link(shipped, own)
        return str(own)
    return str((await ctx.pull_image(inst)).disk)


def _target_state(cmd: Create, manifest: SnapshotManifest) -> TargetState:
    """The state the fork was asked to end in (by default: Running for a Standby snapshot,
    Stopped for a Stopped one)."""
    assert cmd.fork is not None
    return cmd.fork.target_state or (
        "Running" if manifest.kind is SnapshotKind.STANDBY else "Stopped"
    )


async def _undo(ctx: OpContext, inst: LocalInstance) -> None:
    if inst.process is not None:
        await inst.process.kill_and_reap()
        inst.process = None
    try:
        await release_network(ctx, inst, record=False)
    except Exception as exc:
        ctx.oplog(inst, "fork undo: network not released", level="ERROR", error=exc)
    ctx.storage.remove_guest(inst.id)
    ctx.on_removed(inst.record)
