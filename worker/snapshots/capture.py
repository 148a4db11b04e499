"""createsnapshot: save an instance as a snapshot of its own, leaving the instance as it was.

- kind Standby of a Running instance: the driver pauses the VM, saves its memory and device
  state, the disks are copied while it is paused (so they match the memory), and the VM goes
  on running (``Hypervisor.save_live``). The pause lasts the memory save plus the disk copy.
- kind Standby of a Standby instance: its standby files are hard-linked (they are never
  written again; a restore removes only its own names for them), its disks copied.
- kind Stopped: the disks only, of a Stopped or Standby instance (their disks are quiet).

A disk "copy" is a reflink where the filesystem has them, else a sparse copy of the
written blocks (``store.copy_cow``); the files below a forked instance's own layer are
hard-linked. Everything is made in a partial directory that is removed on any failure
(a full disk answers 507), and the manifest is written last.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.errors import Conflict, HypervisorError, InsufficientStorage
from schemas.messages import CreateSnapshot
from schemas.snapshots import SnapshotDisk, SnapshotKind, SnapshotManifest, SnapshotSource
from worker.drivers.base import DiskSpec, VmSpec
from worker.lifecycle.context import LocalInstance, OpContext
from worker.snapshots.identity import file_identity, vmm_version
from worker.snapshots.layers import chain, disk_format
from worker.snapshots.store import (
    DISKS_DIR,
    VM_DIR,
    SnapshotStore,
    copy_cow,
    file_entries,
    link_tree,
)
from worker.states import Op
from worker.storage import storage_error

__all__ = ["create_snapshot", "snapshot_store"]


#: Free space under which a failed save is taken for a full disk (507, not 500).
_FULL_BELOW_BYTES = 16 << 20


def snapshot_store(ctx: OpContext) -> SnapshotStore:
    return SnapshotStore(ctx.storage.guests.parent)


async def create_snapshot(ctx: OpContext, inst: LocalInstance, cmd: CreateSnapshot) -> None:
    # 1. Refused from a state without a consistent VM to save, before anything is made.
    ctx.walk(inst, Op.SNAPSHOT)
    store = snapshot_store(ctx)
    if store.read(cmd.snapshot_id) is not None:
        return  # made already (a redelivered command)
    _check_kind(inst, cmd.kind)
    _check_name(store, inst, cmd.name)
    spec = _current_spec(inst)
    _check_room(store, inst, cmd.kind, spec)
    partial = store.begin(cmd.snapshot_id)
    try:
        # 2. The VM (kind Standby) and the disks, then what the snapshot depends on.
        started = time.monotonic()
        await _save(ctx, inst, cmd.kind, spec, partial)
        saved_s = time.monotonic() - started
        manifest = await _manifest(ctx, inst, cmd, spec, partial)
        store.complete(partial, manifest)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise storage_error(f"snapshot {cmd.snapshot_id} failed: {exc}") from exc
    except HypervisorError as exc:
        # The VMM writes the memory through a pipe: a full disk reaches it as a broken pipe.
        full = shutil.disk_usage(partial).free < _FULL_BELOW_BYTES
        shutil.rmtree(partial, ignore_errors=True)
        if full:
            raise InsufficientStorage(
                f"snapshot {cmd.snapshot_id} failed: the host's disk is full ({exc})"
            ) from exc
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    ctx.oplog(
        inst,
        "snapshot taken",
        snapshot=cmd.snapshot_id,
        kind=cmd.kind.value,
        bytes=manifest.size_bytes,
        allocated=manifest.allocated_bytes,
        save_ms=int(saved_s * 1000),
        total_ms=int((time.monotonic() - started) * 1000),
    )


def _check_kind(inst: LocalInstance, kind: SnapshotKind) -> None:
    state = inst.state
    if kind is SnapshotKind.STANDBY and state is InstanceState.STOPPED:
        raise Conflict(
            "a Stopped instance has no memory to save: take a snapshot of kind Stopped",
            code="invalid_state",
        )
    if kind is SnapshotKind.STOPPED and state is InstanceState.RUNNING:
        raise Conflict(
            "a snapshot of kind Stopped holds disks only, and a Running instance's disks are "
            "in use: stop it first, or take a snapshot of kind Standby",
            code="invalid_state",
        )


def _check_name(store: SnapshotStore, inst: LocalInstance, name: str | None) -> None:
    """hypeman: a snapshot's name is unique among its source instance's snapshots."""
    if name is None:
        return
    for manifest in store.list():
        if manifest.source.id == inst.id and manifest.name == name:
            raise Conflict(
                f"instance {inst.record.name} already has a snapshot named {name}",
                code="already_exists",
            )


def _check_room(
    store: SnapshotStore, inst: LocalInstance, kind: SnapshotKind, spec: VmSpec
) -> None:
    """507 before the VM is paused when the host's disk cannot hold what the snapshot
    writes: the memory of a running VM (at most its size) and the written blocks of its
    writable disks (a sparse copy writes those; a reflink would write none)."""
    needed = sum(
        Path(d.path).stat().st_blocks * 512
        for d in spec.disks
        if (not d.readonly or d.id == "config") and Path(d.path).exists()
    )
    if kind is SnapshotKind.STANDBY and inst.state is InstanceState.RUNNING:
        needed += spec.memory_bytes
    store.root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(store.root).free
    if needed > free:
        raise InsufficientStorage(
            f"the host's disk has {free >> 20} MiB free; snapshot of {inst.record.name} "
            f"needs up to {needed >> 20} MiB"
        )


def _current_spec(inst: LocalInstance) -> VmSpec:
    """The device model the instance runs (or was saved or last booted) with."""
    if inst.state is InstanceState.RUNNING and inst.spec is not None:
        return inst.spec
    guest = inst.guest
    for path in (guest.snapshot / "vm.json", guest.vm_spec):
        if path.exists():
            return guest.read(path, VmSpec)
    raise Conflict(f"instance {inst.id} has never run: nothing to snapshot", code="invalid_state")


async def _save(
    ctx: OpContext, inst: LocalInstance, kind: SnapshotKind, spec: VmSpec, partial: Path
) -> None:
    disks = partial / DISKS_DIR
    if kind is SnapshotKind.STOPPED:
        await _copy_disks(spec, disks)
        return
    vm = partial / VM_DIR
    if inst.state is InstanceState.STANDBY:
        link_tree(inst.guest.snapshot, vm)
        await _copy_disks(spec, disks)
        return
    assert inst.process is not None
    vm.mkdir()
    inst.guest.write(vm / "vm.json", spec)
    await ctx.driver.save_live(spec, inst.process, vm, lambda: _copy_disks(spec, disks))


async def _copy_disks(spec: VmSpec, disks: Path) -> None:
    """Each writable disk's file: its top copied, the files below it hard-linked; and the
    config disk copied (the guest has it mounted; a fork resumes with it)."""
    for disk in spec.disks:
        if disk.readonly and disk.id != "config":
            continue  # the image's rootfs, a read-only volume: the host provides them
        top = Path(disk.path)
        target = disks / top.name
        await copy_cow(top, target)
        for below in list(chain(top))[1:]:  # at their places relative to the top
            link = disks / below.relative_to(top.parent)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.hardlink_to(below)


async def _manifest(
    ctx: OpContext, inst: LocalInstance, cmd: CreateSnapshot, spec: VmSpec, partial: Path
) -> SnapshotManifest:
    record = inst.record
    files = await file_entries(partial)
    if not files:
        raise storage_error("the snapshot holds no files")
    return SnapshotManifest(
        id=cmd.snapshot_id,
        name=cmd.name,
        kind=cmd.kind,
        created_at=utc_now(),
        host=ctx.host_id,
        tags=dict(cmd.tags),
        scheduled=cmd.scheduled,
        source=SnapshotSource(
            id=record.id,
            name=record.name,
            image=record.image,
            image_digest=record.image_digest,
            size_bytes=record.size_bytes,
            hotplug_bytes=record.hotplug_bytes,
            overlay_bytes=record.overlay_bytes,
            disk_io_bps=record.disk_io_bps,
            vcpus=record.vcpus,
            env=dict(record.env),
            network_enabled=record.network_enabled,
            cmd=record.cmd,
            entrypoint=record.entrypoint,
            state=record.state,
            volume_ids=[m.volume_id for m in record.volumes],
        ),
        hypervisor=spec.hypervisor,
        vmm_version=await vmm_version(ctx.driver, spec),
        kernel=await file_identity(spec.kernel),
        initrd=await file_identity(spec.initrd),
        memory_bytes=spec.memory_bytes,
        vcpus=spec.vcpus,
        disks=tuple(_disk_entry(disk, partial) for disk in spec.disks),
        files=files,
    )


def _disk_entry(disk: DiskSpec, partial: Path) -> SnapshotDisk:
    copied = partial / DISKS_DIR / Path(disk.path).name
    held = copied.exists() and not (disk.readonly and disk.id != "config")
    return SnapshotDisk(
        id=disk.id,
        serial=disk.serial,
        readonly=disk.readonly,
        file=f"{DISKS_DIR}/{copied.name}" if held else None,
        format=disk_format(copied) if held else "raw",
        volume_id=disk.volume_id,
    )
