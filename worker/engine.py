"""The host engine: this host's instances, one operation at a time per instance.

It is the Python API the worker daemon puts behind NATS. Operations on one instance are
serialised by a per-instance lock (hypeman does the same); operations on different
instances run concurrently. Each instance command runs the handler :data:`OPERATIONS`
names for its op. What the host has promised is kept by :mod:`worker.capacity`; a worker
start rebuilds the table through :mod:`worker.recovery`; :mod:`worker.vmm_watch` records
VMMs that exit on their own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import anyio

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.errors import Conflict, NotFound
from schemas.messages import Create, Delete, InstanceCommand, InstanceRecord, Stop
from schemas.sizes import GIB
from worker.capacity import CapacityAccount
from worker.host import HostUsage, read_capacity, unwritten_bytes
from worker.lifecycle import create, delete, restore, standby, start, stop, update, volumes
from worker.lifecycle.context import LocalInstance, OpContext
from worker.recovery import recover
from worker.snapshots import capture, fork, ops
from worker.snapshots import restore as snapshot_restore
from worker.states import TRANSITIONS, Op
from worker.transfer.names import MOVING_MARK
from worker.vmm_watch import watch_vmms

__all__ = ["OPERATIONS", "HostEngine"]

log = logging.getLogger(__name__)

#: An operation on an instance that exists: ``(ctx, inst, cmd)``.
Operation = Callable[[OpContext, LocalInstance, Any], Awaitable[None]]

#: The lifecycle operation each op runs on an existing instance. Create and delete, which
#: add an instance to the table and take it out, are the engine's own (:meth:`_create`,
#: :meth:`_delete`).
OPERATIONS: Final[dict[Op, Operation]] = {
    Op.START: start.start,
    Op.STOP: stop.stop,
    Op.STANDBY: standby.standby,
    Op.RESTORE: restore.restore,
    Op.UPDATE: update.update,
    Op.ATTACH_VOLUME: volumes.attach_volume,
    Op.DETACH_VOLUME: volumes.detach_volume,
    Op.SNAPSHOT: capture.create_snapshot,
    Op.RESTORE_SNAPSHOT: snapshot_restore.restore_snapshot,
    Op.SET_SNAPSHOT_SCHEDULE: ops.set_snapshot_schedule,
}


class HostEngine:
    def __init__(self, ctx: OpContext) -> None:
        self.ctx = ctx
        self._instances: dict[str, LocalInstance] = {}
        self._locks: dict[str, anyio.Lock] = {}
        #: instance id -> the command a previous worker died in (its ``command`` mark).
        self._interrupted: dict[str, str] = {}
        #: Instances whose create (or fork) is under way: not in the table until it ends.
        self._creating: set[str] = set()
        self.capacity = CapacityAccount(
            host_id=ctx.host_id,
            limits=lambda: ctx.limits,
            records=self.records,
            disk_free=lambda: read_capacity(ctx.storage.guests.parent).disk_free_bytes,
            disk_unwritten=self._disk_unwritten,
        )

    # -- reads -------------------------------------------------------------------------------

    def get(self, instance_id: str) -> InstanceRecord:
        return self._require(instance_id).record

    def records(self) -> Iterator[InstanceRecord]:
        return (inst.record for inst in list(self._instances.values()))

    def instance(self, instance_id: str) -> LocalInstance:
        return self._require(instance_id)

    def log_dirs(self) -> dict[str, Path]:
        """Each instance's log directory, those whose create is under way included (once
        the create made it): a boot's lines are shipped as the guest writes them, not only
        after its create ended (which waits for the guest agent)."""
        dirs = {iid: self.ctx.storage.guest(iid).logs for iid in self._creating}
        dirs = {iid: path for iid, path in dirs.items() if path.is_dir()}
        dirs.update({iid: inst.guest.logs for iid, inst in list(self._instances.items())})
        return dirs

    def usage(self) -> HostUsage:
        """What placement must count (the heartbeat carries it)."""
        return self.capacity.usage(accel=self.ctx.boot.accel, images=self._ready_images())

    # -- operations --------------------------------------------------------------------------

    async def execute(self, cmd: InstanceCommand) -> InstanceRecord | None:
        """Run one lifecycle command; return the record after it (None once deleted)."""
        instance_id = cmd.instance_id
        async with self._lock(instance_id), self._under_way(cmd):
            self._refuse_while_moving(instance_id)
            op = Op(cmd.op)
            if op is Op.CREATE:
                assert isinstance(cmd, Create)
                await self._create(cmd)
            elif op is Op.DELETE:
                assert isinstance(cmd, Delete)
                await self._delete(cmd)
                return None
            elif not self._done_before_restart(cmd):
                await OPERATIONS[op](self.ctx, self._require(instance_id), cmd)
            inst = self._instances[instance_id]
            self.ctx.save(inst, last_command_id=cmd.id)
            return inst.record

    async def _create(self, cmd: Create) -> None:
        if await self._finish_interrupted_create(cmd):
            return
        self._creating.add(cmd.instance_id)
        try:
            if cmd.fork is not None:
                made = await fork.fork_instance(self.ctx, cmd, self.capacity)
            else:
                made = await create.create(self.ctx, cmd, self.capacity)
            self._instances[cmd.instance_id] = made
        finally:
            self._creating.discard(cmd.instance_id)

    async def _delete(self, cmd: Delete) -> None:
        await delete.delete(self.ctx, self._require(cmd.instance_id), cmd)
        del self._instances[cmd.instance_id]
        self._locks.pop(cmd.instance_id, None)

    @contextlib.asynccontextmanager
    async def _under_way(self, cmd: InstanceCommand) -> AsyncIterator[None]:
        """Mark the instance with the command it runs, so that a worker dying in it leaves
        word for the next one (a create has its own way: _finish_interrupted_create)."""
        inst = self._instances.get(cmd.instance_id)
        if inst is None:
            yield
            return
        inst.guest.mark_command(cmd.id)
        try:
            yield
        finally:
            inst.guest.mark_command(None)

    def _done_before_restart(self, cmd: InstanceCommand) -> bool:
        """The command the previous worker died in, redelivered, finds its effect already
        there (the VM stopped, started, went to standby or was restored; only the record
        was not written): it completes, instead of being refused for the very state it
        asked for."""
        if self._interrupted.get(cmd.instance_id) != cmd.id:
            return False
        del self._interrupted[cmd.instance_id]
        inst = self._require(cmd.instance_id)
        if TRANSITIONS[Op(cmd.op)].result is not inst.state:
            return False  # not done (or an op with no resulting state): it runs again
        self.ctx.oplog(inst, f"{cmd.op} had taken effect before the worker restarted")
        if inst.state is InstanceState.STOPPED and inst.record.state_error:
            self.ctx.save(inst, state_error=None)  # that VMM exit was the one asked for
        return True

    async def _finish_interrupted_create(self, cmd: Create) -> bool:
        """A create redelivered after a worker crash finds its own half-made instance (no
        command ever completed on it). A running one is done; anything else is removed and
        made again. True when there is nothing left to do."""
        inst = self._instances.get(cmd.instance_id)
        if inst is None:
            return False
        if inst.record.last_command_id is not None:
            raise Conflict(f"instance {cmd.instance_id} already exists", code="already_exists")
        if inst.state is InstanceState.RUNNING and inst.process is not None:
            self.ctx.oplog(inst, "create completed by the redelivered command")
            return True
        self.ctx.oplog(inst, "removing the remains of an interrupted create")
        await delete.delete(
            self.ctx, inst, Delete(id=cmd.id, instance_id=inst.id, issued_at=utc_now())
        )
        del self._instances[cmd.instance_id]
        return False

    async def stop_all(self) -> None:
        """Stop every VM that can be stopped (what `vmfleet dev` does on exit)."""
        stoppable = TRANSITIONS[Op.STOP].allowed_from
        async with anyio.create_task_group() as tg:
            for inst in list(self._instances.values()):
                if inst.state in stoppable:
                    tg.start_soon(self._stop_quietly, inst.id)

    async def _stop_quietly(self, instance_id: str) -> None:
        try:
            await self.execute(
                Stop(id=f"shutdown-{instance_id}", instance_id=instance_id, issued_at=utc_now())
            )
        except Exception as exc:
            log.warning("could not stop %s on shutdown: %s", instance_id, exc)

    # -- background work ---------------------------------------------------------------------

    async def recover(self) -> None:
        """Rebuild the table from disk; adopt live VMMs; mark the dead ones."""
        found = await recover(self.ctx)
        self._instances.update(found.instances)
        self._interrupted.update(found.interrupted)

    async def watch_vmms(self, interval_s: float = 1.0) -> None:
        """Record VMMs that exit on their own; note the app's start and end."""
        await watch_vmms(self.ctx, self._instances.values, self._lock, interval_s)

    # -- helpers -----------------------------------------------------------------------------

    def _disk_unwritten(self) -> int:
        """What the sparse disks here may still take: every instance's overlay and volume
        overlays (any state: they live until the instance is deleted), and every volume."""
        total = 0
        for inst in list(self._instances.values()):
            record, guest = inst.record, inst.guest
            total += unwritten_bytes(guest.overlay, record.overlay_bytes)
            total += sum(
                unwritten_bytes(guest.volume_overlay(m.volume_id), m.overlay_bytes)
                for m in record.volumes
                if m.overlay
            )
        volumes = self.ctx.volumes
        for volume in volumes.list():
            total += unwritten_bytes(volumes.data_path(volume.id), volume.size_gb * GIB)
        return total

    def _ready_images(self) -> tuple[str, ...]:
        """Digest and pulled-as name of every image ready on this host."""
        try:
            ready = self.ctx.images.list()
        except (OSError, ValueError) as exc:  # a disk dir going away, a torn metadata file
            log.warning("could not list the ready images: %s", exc)
            return ()
        return tuple(sorted({ref for info in ready for ref in (info.digest, info.name)}))

    # -- moves between hosts (worker.transfer.move) ------------------------------------------

    def has(self, instance_id: str) -> bool:
        return instance_id in self._instances

    def lock(self, instance_id: str) -> anyio.Lock:
        """The instance's operation lock (a move holds it while it sends the files)."""
        return self._lock(instance_id)

    def adopt(self, inst: LocalInstance) -> None:
        """Take in an instance moved here from another host."""
        self._instances[inst.id] = inst

    def forget(self, instance_id: str) -> None:
        """Drop an instance moved to another host: its record is that host's now, so
        nothing is published (and nothing deleted) for it from here."""
        self._instances.pop(instance_id, None)

    def _refuse_while_moving(self, instance_id: str) -> None:
        inst = self._instances.get(instance_id)
        if inst is not None and (inst.guest.root / MOVING_MARK).exists():
            raise Conflict(
                f"instance {instance_id} is being moved to another host; try again once "
                "the move is done",
                code="moving",
            )

    def _require(self, instance_id: str) -> LocalInstance:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise NotFound(f"instance {instance_id} not found")
        return inst

    def _lock(self, instance_id: str) -> anyio.Lock:
        return self._locks.setdefault(instance_id, anyio.Lock())
