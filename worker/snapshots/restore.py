"""restoresnapshot: put an instance back to a snapshot of it, in place.

The instance keeps its id, name, address and MAC. Its disks become new qcow2 layers over
the snapshot's (the snapshot is never written, and stays usable for the next restore);
a snapshot of kind Standby then resumes its memory through ``worker.resume``, as a fork
does, with the instance's own identity and fresh RNG bytes. A snapshot of kind Stopped only
puts the disks back, on a Stopped instance.

Everything the snapshot needs is checked before the instance's VM is touched (it is this
instance's, complete, and this host's VMM and kernel are the ones it was taken under). Once
the old VM is gone a failure leaves the instance Stopped, on its previous disks.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import anyio
import msgspec

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.errors import Conflict
from schemas.messages import HealthState, RestoreSnapshot, Standby, Stop
from schemas.snapshots import SnapshotKind, SnapshotManifest, TargetState
from worker.lifecycle import standby, stop
from worker.lifecycle.context import LocalInstance, OpContext
from worker.lifecycle.network import guest_network, nics, plug, unplug
from worker.resume import GuestIdentity, SavedVm, resume_saved_vm, swap_spec
from worker.snapshots.capture import snapshot_store
from worker.snapshots.identity import check_compatible
from worker.snapshots.layers import chain, disk_format, instance_disk, link_chain, new_top_layer
from worker.snapshots.store import VM_DIR, copy_cow, link_tree
from worker.states import Op

__all__ = ["reach_target_state", "restore_snapshot"]

_SAVED_DIR = "saved"


async def restore_snapshot(ctx: OpContext, inst: LocalInstance, cmd: RestoreSnapshot) -> None:
    walk = ctx.walk(inst, Op.RESTORE_SNAPSHOT)
    store = snapshot_store(ctx)
    manifest = store.require(cmd.snapshot_id)
    if manifest.source.id != inst.id:
        raise Conflict(
            f"snapshot {manifest.id} is of instance {manifest.source.name}, not of "
            f"{inst.record.name}: fork it to get an instance of it",
            code="invalid_state",
        )
    directory = store.directory(manifest.id)
    if manifest.kind is SnapshotKind.STOPPED:
        await _put_disks_back(ctx, inst, manifest, directory)
        return
    saved_dir = inst.guest.root / _SAVED_DIR
    shutil.rmtree(saved_dir, ignore_errors=True)
    link_tree(directory / VM_DIR, saved_dir)
    try:
        saved = SavedVm.load(saved_dir)
        await check_compatible(ctx.driver, manifest, saved.spec, ctx.boot.kernel)
        # Past here the instance's VM is replaced.
        was_running = inst.state is InstanceState.RUNNING
        walk.advance()  # Paused
        previous_top = _top_marker(inst)
        try:
            await _discard_vm(ctx, inst, was_running)
            layers = await _new_layers(ctx, inst, manifest, directory)
            spec = swap_spec(
                saved.spec,
                instance_id=inst.id,
                run_dir=str(inst.guest.run_dir),
                serial_log=str(inst.guest.app_log),
                disks={
                    d.id: msgspec.structs.replace(
                        d, path=layers[d.id], format=disk_format(Path(layers[d.id]))
                    )
                    if d.id in layers
                    else d
                    for d in saved.spec.disks
                },
                nics=nics(ctx, inst),
            )
            await plug(ctx, inst)
            inst.process = await resume_saved_vm(
                ctx.driver,
                saved,
                spec,
                GuestIdentity(
                    hostname=inst.record.name,
                    mac=inst.record.mac if inst.record.network_enabled else None,
                    network=guest_network(ctx, inst),
                ),
                vmm_log=inst.guest.vmm_log,
                guest_timeout_s=ctx.timeouts.guest_ready_s,
            )
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                _restore_top_marker(inst, previous_top)
                with contextlib.suppress(Exception):
                    await unplug(ctx, inst)
            walk.fail(InstanceState.STOPPED, error=f"snapshot restore failed: {exc}")
            raise
    finally:
        shutil.rmtree(saved_dir, ignore_errors=True)
    inst.spec = spec
    inst.guest.write(inst.guest.vm_spec, spec)
    inst.guest.write_pid(inst.process.pid)
    _drop_unused_layers(inst)
    now = utc_now()
    walk.advance(has_snapshot=False, started_at=now, health=HealthState(window_started_at=now))
    ctx.oplog(inst, "restored from snapshot", snapshot=manifest.id)
    await reach_target_state(ctx, inst, cmd.target_state or "Running", cmd.id)


async def _put_disks_back(
    ctx: OpContext, inst: LocalInstance, manifest: SnapshotManifest, directory: Path
) -> None:
    if inst.state is not InstanceState.STOPPED:
        raise Conflict(
            f"snapshot {manifest.id} holds disks only: stop the instance before restoring it",
            code="invalid_state",
        )
    await _new_layers(ctx, inst, manifest, directory)
    _drop_unused_layers(inst)
    ctx.oplog(inst, "disks restored from snapshot", snapshot=manifest.id)


async def _discard_vm(ctx: OpContext, inst: LocalInstance, was_running: bool) -> None:
    """The instance's current VM goes: its VMM (no shutdown: its state is being replaced)
    or its standby files."""
    if inst.process is not None:
        await inst.process.kill_and_reap()
        inst.process = None
        inst.guest.write_pid(None)
    if was_running:
        await unplug(ctx, inst)
    shutil.rmtree(inst.guest.snapshot, ignore_errors=True)


async def _new_layers(
    ctx: OpContext, inst: LocalInstance, manifest: SnapshotManifest, directory: Path
) -> dict[str, str]:
    """New qcow2 layers over the snapshot's writable disks, a copy of its config disk; by
    disk id, the paths (the image's rootfs stays where it is)."""
    layers: dict[str, str] = {}
    guest = inst.guest
    for disk in manifest.disks:
        if disk.file is None:
            continue
        if disk.id == "config":
            await copy_cow(directory / disk.file, guest.config_disk)
            layers[disk.id] = str(guest.config_disk)
            continue
        base = link_chain(directory / disk.file, guest.root / "disks" / manifest.id)
        layers[disk.id] = str(new_top_layer(guest.root / "disks", disk.id, inst.id, base))
    return layers


def _top_marker(inst: LocalInstance) -> bytes | None:
    try:
        return (inst.guest.root / "disks" / "overlay.top").read_bytes()
    except FileNotFoundError:
        return None


def _restore_top_marker(inst: LocalInstance, previous: bytes | None) -> None:
    marker = inst.guest.root / "disks" / "overlay.top"
    if previous is None:
        marker.unlink(missing_ok=True)
    else:
        marker.write_bytes(previous)


def _drop_unused_layers(inst: LocalInstance) -> None:
    """The layers the instance no longer reads (its plain overlay and older layers)."""
    current = instance_disk(inst.guest.root, "overlay")
    if current is None:
        return
    keep = set(chain(current[0]))
    inst.guest.overlay.unlink(missing_ok=True)
    layers = inst.guest.root / "disks"
    for path in sorted(layers.rglob("*"), reverse=True):  # files before their directories
        if path.is_dir():
            with contextlib.suppress(OSError):
                path.rmdir()  # only once empty
        elif path.suffix != ".top" and path not in keep:
            path.unlink(missing_ok=True)


async def reach_target_state(
    ctx: OpContext, inst: LocalInstance, target: TargetState, command_id: str
) -> None:
    """A resumed instance (a restored snapshot, a fork) put into the state it was asked to
    end in, under the command that asked."""
    if target == "Running" or inst.state is not InstanceState.RUNNING:
        return
    now = utc_now()
    if target == "Standby":
        await standby.standby(ctx, inst, Standby(id=command_id, instance_id=inst.id, issued_at=now))
    else:
        await stop.stop(ctx, inst, Stop(id=command_id, instance_id=inst.id, issued_at=now))
