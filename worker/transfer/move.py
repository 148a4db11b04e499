"""Moving a Standby instance to another host, in three commands the gateway sends.

1. ``ExportInstance`` on the old host: only a Standby instance with its saved memory, no
   volumes (they are files of the old host and do not travel), QEMU (a Cloud Hypervisor
   snapshot names host paths inside its own config). Its directory goes into the
   transfers store as a bundle, and a ``moving`` mark makes the old host refuse every
   other command on it: nothing may change what was sent.
2. ``ImportInstance`` on the new host: the bundle is fetched and verified, renamed into
   the guests directory, its saved device model pointed at this host's files, and the
   record written with this host in it. That write is the hand-over: from it on, the
   instance lives here (restore it as any Standby instance).
3. ``FinishMove`` on the old host: it deletes its copy only once the record names another
   host (``moved``), or drops the mark when the import failed; then the bundle goes.

At every moment exactly one host's record owns the instance: the old host's until the
new host's record write, the new host's after it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from schemas.api import InstanceState
from schemas.codec import decode_instance_record
from schemas.errors import BadRequest, Conflict, InvalidState
from schemas.messages import ExportInstance, FinishMove, ImportInstance, InstanceRecord
from schemas.transfers import volumes_attached
from worker.drivers.base import VmSpec
from worker.engine import HostEngine
from worker.lifecycle.context import LocalInstance
from worker.storage import GuestDir
from worker.transfer.cache import HostCache
from worker.transfer.names import MOVING_MARK
from worker.transfer.store import delete_bundle
from worker.transfer.upload import upload_bundle

__all__ = ["MOVING_MARK", "Mover"]

log = logging.getLogger(__name__)

#: What does not travel: the VMM's sockets, its pid and command marks, the moving mark.
_LOCAL_ONLY = frozenset({"run", "vmm.pid", "command", MOVING_MARK})
#: The image disk the saved VM ran on, travelling with it: each host builds an image's
#: disk itself (mkfs), so another host's disk of the same image is not the same bytes,
#: and the guest's page cache holds blocks of this one. It stays the instance's own.
IMAGE_DISK = "image-root.ext4"


class Mover:
    def __init__(
        self, engine: HostEngine, store: ObjectStore, cache: HostCache, records: KeyValue
    ) -> None:
        self.engine = engine
        self.store = store
        self.cache = cache
        self.records = records

    @property
    def host_id(self) -> str:
        return self.engine.ctx.host_id

    # -- 1. old host -------------------------------------------------------------------------

    async def export(self, cmd: ExportInstance) -> InstanceRecord:
        async with self.engine.lock(cmd.instance_id):
            inst = self.engine.instance(cmd.instance_id)
            mark = inst.guest.root / MOVING_MARK
            if not mark.exists():
                _check_movable(inst)
            # A mark of an earlier move (its gateway gave up on it) is taken over: no
            # command ran on the instance since, so what it sent then is what it is now.
            mark.write_text(cmd.bundle)
            saved = inst.guest.read(inst.guest.snapshot / "vm.json", VmSpec)
            try:
                stats = await upload_bundle(
                    self.store,
                    cmd.bundle,
                    inst.guest.root,
                    exclude=_LOCAL_ONLY | {IMAGE_DISK},
                    extra={IMAGE_DISK: _image_disk(inst.guest, saved)},
                )
            except BaseException:
                mark.unlink(missing_ok=True)
                raise
            self.cache.observe("sent", stats.bytes_sent, stats.seconds)
            self.engine.ctx.oplog(
                inst,
                "sent to the transfers store for a move",
                bundle=cmd.bundle,
                bytes=stats.bytes_sent,
                seconds=f"{stats.seconds:.2f}",
            )
            return inst.record

    # -- 2. new host -------------------------------------------------------------------------

    async def import_(self, cmd: ImportInstance) -> InstanceRecord:
        async with self.engine.lock(cmd.instance_id):
            if self.engine.has(cmd.instance_id):
                record = self.engine.get(cmd.instance_id)
                if record.host == self.host_id:
                    return record  # redelivered after it took effect
                raise Conflict(f"instance {cmd.instance_id} is on this host already")
            ctx = self.engine.ctx
            guest = ctx.storage.guest(cmd.instance_id)
            record = msgspec.structs.replace(cmd.record, host=self.host_id)
            inst = LocalInstance(record=record, guest=guest)
            await self.cache.fetch(cmd.bundle)
            shutil.rmtree(guest.root, ignore_errors=True)  # an earlier import's remains
            guest.root.parent.mkdir(parents=True, exist_ok=True)
            self.cache.take(cmd.bundle, guest.root)
            for sub in (guest.run_dir, guest.logs):
                sub.mkdir(exist_ok=True)
            _repoint(guest, str(guest.root / IMAGE_DISK), ctx.boot.kernel, ctx.boot.initrd)
            inst.guest.write(guest.metadata, record)
            self.engine.adopt(inst)
            ctx.oplog(inst, "moved here from another host", bundle=cmd.bundle)
            ctx.save(inst)  # the hand-over: the record names this host
            return inst.record

    # -- 3. old host -------------------------------------------------------------------------

    async def finish(self, cmd: FinishMove) -> InstanceRecord | None:
        async with self.engine.lock(cmd.instance_id):
            if not self.engine.has(cmd.instance_id):
                await delete_bundle(self.store, cmd.bundle)
                return None  # done before (a redelivered finish)
            inst = self.engine.instance(cmd.instance_id)
            if cmd.moved:
                owner = await self._owner(cmd.instance_id)
                if owner == self.host_id:
                    raise Conflict(
                        f"instance {cmd.instance_id}'s record still names this host: "
                        "its copy here is kept"
                    )
                self.engine.forget(cmd.instance_id)
                _delete_local_copy(inst)
                log.info("instance %s moved to %s: local copy deleted", inst.id, owner)
            else:
                (inst.guest.root / MOVING_MARK).unlink(missing_ok=True)
            await delete_bundle(self.store, cmd.bundle)
            return None if cmd.moved else inst.record

    # -- a worker's start ----------------------------------------------------------------------

    async def settle_interrupted(self) -> None:
        """Moves this host was in the middle of when its worker stopped: an instance whose
        record names another host now has moved (its copy here goes, unpublished); one
        whose record still names this host stays here, no longer marked."""
        for record in list(self.engine.records()):
            inst = self.engine.instance(record.id)
            mark = inst.guest.root / MOVING_MARK
            if not mark.exists():
                continue
            owner = await self._owner(record.id)
            if owner is not None and owner != self.host_id:
                self.engine.forget(record.id)
                _delete_local_copy(inst)
                log.info("instance %s had moved to %s: local copy deleted", record.id, owner)
            else:
                mark.unlink(missing_ok=True)
                log.info("instance %s: an interrupted move is dropped; it stays here", record.id)

    async def _owner(self, instance_id: str) -> str | None:
        try:
            entry = await self.records.get(instance_id)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return decode_instance_record(entry.value).host


def _delete_local_copy(inst: LocalInstance) -> None:
    """The record goes first: a worker restarting half-way finds no instance here (only
    files no record names, removed by the next import of that id)."""
    inst.guest.metadata.unlink(missing_ok=True)
    shutil.rmtree(inst.guest.root, ignore_errors=True)


def _check_movable(inst: LocalInstance) -> None:
    record = inst.record
    if record.state is not InstanceState.STANDBY or not inst.guest.has_snapshot():
        raise InvalidState(
            f"instance {inst.id} is {record.state.value}: only a Standby instance can move "
            "(put it in standby first)"
        )
    if record.volumes:
        volume_ids = [m.volume_id for m in record.volumes]
        raise Conflict(volumes_attached(inst.id, volume_ids, record.host), code="volumes_attached")
    spec = inst.guest.read(inst.guest.snapshot / "vm.json", VmSpec)
    if spec.hypervisor != "qemu":
        raise BadRequest(
            f"instance {inst.id} runs under {spec.hypervisor}, whose saved VM names this "
            "host's paths: only QEMU instances move between hosts yet",
            code="not_movable",
        )
    if record.tap:
        raise BadRequest(
            f"instance {inst.id} is on this host's bridge (TAP {record.tap}, its address "
            "leased here): only user-mode instances move between hosts yet",
            code="not_movable",
        )


def _image_disk(guest: GuestDir, saved: VmSpec) -> Path:
    """The image disk the saved VM runs on (its own copy, if it was moved here before)."""
    own = guest.root / IMAGE_DISK
    if own.exists():
        return own
    root = next((d for d in saved.disks if d.id == "root"), None)
    if root is None:
        raise BadRequest(f"instance {guest.id}'s saved VM has no image disk", code="not_movable")
    return Path(root.path)


def _repoint(guest: GuestDir, image_disk: str, kernel: Path, initrd: Path) -> None:
    """Point the saved device model (and the last boot's) at this host's files: the
    instance's own directory, this host's copy of the image, its kernel and initrd. The
    devices stay the same, which is what the saved memory needs."""
    for path in (guest.snapshot / "vm.json", guest.vm_spec):
        if not path.exists():
            continue
        spec = guest.read(path, VmSpec)
        old_root = str(Path(spec.run_dir).parent)
        new_root = str(guest.root)

        def moved(p: str, old: str = old_root, new: str = new_root) -> str:
            return new + p[len(old) :] if p == old or p.startswith(old + "/") else p

        disks = tuple(
            msgspec.structs.replace(d, path=image_disk if d.id == "root" else moved(d.path))
            for d in spec.disks
        )
        spec = msgspec.structs.replace(
            spec,
            kernel=str(kernel),
            initrd=str(initrd),
            disks=disks,
            serial_log=moved(spec.serial_log),
            run_dir=moved(spec.run_dir),
        )
        guest.write(path, spec)
