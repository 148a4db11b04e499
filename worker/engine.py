"""The host engine: this host's instances, one operation at a time per instance.

It is the Python API the worker daemon puts behind NATS. Operations on one instance are
serialised by a per-instance lock (hypeman does the same); operations on different
instances run concurrently. On start, :meth:`HostEngine.recover` rebuilds the view from
disk and from the VMMs still running, so a worker restart loses nothing.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import anyio

from schemas.api import InstanceState
from schemas.errors import Conflict, HypervisorError, NoCapacity, NotFound
from schemas.messages import (
    AnyCommand,
    AttachVolume,
    Create,
    Delete,
    DetachVolume,
    InstanceRecord,
    Restore,
    Standby,
    Start,
    Stop,
    host_port_key,
)
from schemas.sizes import GIB
from worker.drivers.base import VmSpec
from worker.guest.control import GuestControlError, guest_request
from worker.host import HostUsage, read_capacity, unwritten_bytes
from worker.lifecycle import create, delete, restore, standby, start, stop, volumes
from worker.lifecycle.context import LocalInstance, OpContext
from worker.lifecycle.network import unplug
from worker.proc import VmmProcess, find_vmms
from worker.states import TRANSITIONS, Op

__all__ = ["HostEngine"]

log = logging.getLogger(__name__)


class HostEngine:
    def __init__(self, ctx: OpContext) -> None:
        self.ctx = ctx
        self._instances: dict[str, LocalInstance] = {}
        self._locks: dict[str, anyio.Lock] = {}
        #: Creates under way: in ``_instances`` only once they return, but holding their
        #: share of the host from the moment they pass the check, so that creates running
        #: side by side (sent by several gateways) cannot together over-commit it.
        self._creating: dict[str, Create] = {}
        #: instance id -> the command a previous worker died in (its ``command`` mark).
        self._interrupted: dict[str, str] = {}

    # -- reads -------------------------------------------------------------------------------

    def get(self, instance_id: str) -> InstanceRecord:
        return self._require(instance_id).record

    def records(self) -> Iterator[InstanceRecord]:
        return (inst.record for inst in list(self._instances.values()))

    def instance(self, instance_id: str) -> LocalInstance:
        return self._require(instance_id)

    # -- operations --------------------------------------------------------------------------

    async def execute(self, cmd: AnyCommand) -> InstanceRecord | None:
        """Run one lifecycle command; return the record after it (None once deleted)."""
        assert hasattr(cmd, "instance_id")
        instance_id: str = cmd.instance_id
        async with self._lock(instance_id), self._under_way(cmd):
            match cmd:
                case Start() | Stop() | Standby() | Restore() if self._done_before_restart(cmd):
                    pass  # only its record was left to write
                case Create():
                    if not await self._finish_interrupted_create(cmd):
                        self._check_room_for(cmd)
                        taken = self._ports_taken()
                        self._creating[instance_id] = cmd
                        try:
                            self._instances[instance_id] = await create.create(
                                self.ctx, cmd, taken_ports=taken
                            )
                        finally:
                            del self._creating[instance_id]
                case Start():
                    await start.start(self.ctx, self._require(instance_id), cmd)
                case Stop():
                    await stop.stop(self.ctx, self._require(instance_id), cmd)
                case Standby():
                    await standby.standby(self.ctx, self._require(instance_id), cmd)
                case Restore():
                    await restore.restore(self.ctx, self._require(instance_id), cmd)
                case AttachVolume():
                    await volumes.attach_volume(self.ctx, self._require(instance_id), cmd)
                case DetachVolume():
                    await volumes.detach_volume(self.ctx, self._require(instance_id), cmd)
                case Delete():
                    await delete.delete(self.ctx, self._require(instance_id), cmd)
                    del self._instances[instance_id]
                    self._locks.pop(instance_id, None)
                    return None
                case _:
                    raise TypeError(f"not an instance command: {cmd.op}")
            inst = self._instances[instance_id]
            self.ctx.save(inst, last_command_id=cmd.id)
            return inst.record

    @contextlib.asynccontextmanager
    async def _under_way(self, cmd: AnyCommand) -> AsyncIterator[None]:
        """Mark the instance with the command it runs, so that a worker dying in it leaves
        word for the next one (a create has its own way: _finish_interrupted_create)."""
        inst = self._instances.get(getattr(cmd, "instance_id", ""))
        if inst is None:
            yield
            return
        inst.guest.mark_command(cmd.id)
        try:
            yield
        finally:
            inst.guest.mark_command(None)

    def _done_before_restart(self, cmd: Start | Stop | Standby | Restore) -> bool:
        """The command the previous worker died in, redelivered, finds its effect already
        there (the VM stopped, started, went to standby or was restored; only the record
        was not written): it completes, instead of being refused for the very state it
        asked for."""
        if self._interrupted.get(cmd.instance_id) != cmd.id:
            return False
        del self._interrupted[cmd.instance_id]
        inst = self._require(cmd.instance_id)
        if TRANSITIONS[Op(cmd.op)].result is not inst.state:
            return False  # not done: it runs again
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
            self.ctx, inst, Delete(id=cmd.id, instance_id=inst.id, issued_at=_now())
        )
        del self._instances[cmd.instance_id]
        return False

    async def stop_all(self) -> None:
        """Stop every running VM (what `vmfleet dev` does on exit)."""
        async with anyio.create_task_group() as tg:
            for inst in list(self._instances.values()):
                if inst.state is InstanceState.RUNNING:
                    tg.start_soon(self._stop_quietly, inst.id)

    async def _stop_quietly(self, instance_id: str) -> None:
        try:
            await self.execute(
                Stop(id=f"shutdown-{instance_id}", instance_id=instance_id, issued_at=_now())
            )
        except Exception as exc:
            log.warning("could not stop %s on shutdown: %s", instance_id, exc)

    def _check_room_for(self, cmd: Create) -> None:
        """Refuse (503 ``host_full``) a create that would take the host past its vCPU or
        memory limit, or promise more disk than is free; the gateway then places it on
        another host."""
        limits = self.ctx.limits
        if limits is None:
            return
        held_vcpus, held_memory = self._held()
        vcpus = held_vcpus + cmd.vcpus
        memory = held_memory + cmd.size_bytes + cmd.hotplug_bytes
        disk = self._disk_promised() + cmd.disk_bytes
        disk_free = read_capacity(self.ctx.storage.guests.parent).disk_free_bytes
        if vcpus > limits.vcpus or memory > limits.memory_bytes or disk > disk_free:
            raise NoCapacity(
                f"host {self.ctx.host_id} is full: {vcpus} of {limits.vcpus:g} vCPUs, "
                f"{memory >> 20} of {int(limits.memory_bytes) >> 20} MiB of memory, and "
                f"{disk >> 20} MiB of disk of {disk_free >> 20} MiB free would be in use",
                code="host_full",
            )

    def _ports_taken(self) -> set[tuple[str, int]]:
        """Host ports held by this host's instances, whatever their state, and by the
        creates under way."""
        mappings = [m for inst in self._instances.values() for m in inst.record.port_mappings]
        mappings += [m for cmd in self._creating.values() for m in cmd.port_mappings]
        return {(str(m.protocol or "tcp"), m.host_port) for m in mappings}

    def usage(self) -> HostUsage:
        """What placement must count (the heartbeat carries it): vCPUs and memory of the
        VMs that have a VMM and of the creates under way, the disk the instances and
        volumes may still take, the host ports held, and the images ready here."""
        vcpus, memory = self._held()
        return HostUsage(
            vcpus=vcpus,
            memory_bytes=memory,
            instances=len(self._instances) + len(self._creating),
            accel=self.ctx.boot.accel,
            disk_promised_bytes=self._disk_promised(),
            ports=tuple(sorted(host_port_key(port, proto) for proto, port in self._ports_taken())),
            images=self._ready_images(),
        )

    def _held(self) -> tuple[int, int]:
        """vCPUs and memory (size + hotplug) of the VMs that have a VMM, as hypeman counts
        them, and of the creates under way."""
        holding = (InstanceState.RUNNING, InstanceState.PAUSED, InstanceState.CREATED)
        live = [inst.record for inst in self._instances.values() if inst.state in holding]
        creating = list(self._creating.values())
        return (
            sum(r.vcpus for r in live) + sum(c.vcpus for c in creating),
            sum(r.size_bytes + r.hotplug_bytes for r in live)
            + sum(c.size_bytes + c.hotplug_bytes for c in creating),
        )

    def _disk_promised(self) -> int:
        """What the sparse disks here may still take: every instance's overlay and volume
        overlays (any state: they live until the instance is deleted), every volume, and
        the creates under way in full."""
        total = sum(cmd.disk_bytes for cmd in self._creating.values())
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

    async def watch_vmms(self, interval_s: float = 1.0) -> None:
        """Notice a VMM that exits on its own (guest power-off, crash) and record it; note
        in the ops log when the guest reports the app started or exited."""
        while True:
            await anyio.sleep(interval_s)
            for inst in list(self._instances.values()):
                if self._lock(inst.id).locked():
                    continue  # an operation is under way; it owns the VMM for now
                async with self._lock(inst.id):
                    if self._died_unwatched(inst):
                        self._record_vmm_exit(inst)
                        await self._unplug_quietly(inst)
                    elif inst.state is InstanceState.RUNNING and inst.spec is not None:
                        await self._note_app_status(inst)

    async def _note_app_status(self, inst: LocalInstance) -> None:
        """Ask the guest's init how the app is doing until it has started and exited."""
        if inst.app_status is not None and inst.app_status.startswith(("exited", "failed")):
            return
        assert inst.spec is not None
        try:
            status = await guest_request(
                self.ctx.driver.control_socket(inst.spec), "status", timeout_s=1
            )
        except GuestControlError:
            return  # still booting, or busy: ask again next round
        if status != inst.app_status and status.split()[0] in ("running", "exited", "failed"):
            inst.app_status = status
            word, _, detail = status.partition(" ")
            message = {"running": "app started", "exited": "app exited", "failed": "app failed"}
            self.ctx.oplog(
                inst,
                message[word],
                level="ERROR" if word == "failed" else "INFO",
                detail=detail or None,
            )

    def _died_unwatched(self, inst: LocalInstance) -> bool:
        return (
            inst.process is not None
            and inst.state is InstanceState.RUNNING
            and not inst.process.running()
        )

    def _record_vmm_exit(self, inst: LocalInstance) -> None:
        assert inst.process is not None
        status = inst.process.returncode
        inst.process = None
        inst.guest.write_pid(None)
        self.ctx.set_state(
            inst,
            InstanceState.STOPPED,
            error=f"VMM exited on its own (exit status {status}); see the vmm and app logs",
            stopped_at=_now(),
        )

    # -- recovery ----------------------------------------------------------------------------

    async def recover(self) -> None:
        """Rebuild the table from disk; adopt live VMMs; mark the dead ones."""
        for guest in self.ctx.storage.existing():
            record = guest.read(guest.metadata, InstanceRecord)
            inst = LocalInstance(record=record, guest=guest)
            self._instances[record.id] = inst
            if (interrupted := guest.read_command()) is not None:
                self._interrupted[record.id] = interrupted
            await self._reconcile(inst)
        await self._kill_unrecorded_vmms()
        if self.ctx.bridge is not None:
            await self._recover_network()

    async def _kill_unrecorded_vmms(self) -> None:
        """A VMM that no adopted pid file names was started by an operation the previous
        worker died in before recording it (create, start, restore: each is redone when its
        command is redelivered), or belongs to no instance: it must not run on beside the VMM
        the redone operation starts, so it is killed."""
        adopted = {inst.process.pid for inst in self._instances.values() if inst.process}
        for pid in set(find_vmms(self.ctx.storage.guests)) - adopted:
            process = VmmProcess.adopt(pid, cmdline_must_contain=f"{self.ctx.storage.guests}/")
            if process is not None:
                log.warning("killing VMM pid %d: no instance record accounts for it", pid)
                try:
                    await process.kill_and_reap()
                except HypervisorError as exc:
                    log.error("could not kill VMM pid %d: %s", pid, exc)

    async def _recover_network(self) -> None:
        """bridge mode: Running instances keep TAP, lease and rules; Standby ones keep lease
        and rules (their TAP comes back on restore); every other instance keeps its lease
        (its address is its own until deleted); everything else goes, including what
        instances that no longer exist left behind."""
        bridge = self.ctx.bridge
        assert bridge is not None
        keep: set[str] = set()
        keep_taps: set[str] = set()
        keep_leases: set[str] = set()
        for inst in self._instances.values():
            if not inst.record.network_enabled:
                continue
            keep_leases.add(inst.id)
            if inst.process is not None and inst.record.tap:
                keep.add(inst.id)
                keep_taps.add(inst.record.tap)
            elif inst.state is InstanceState.STANDBY and bridge.ipam.lease(inst.id) is not None:
                keep.add(inst.id)
        removed = await bridge.remove_leftovers(
            keep_taps=keep_taps, keep=keep, keep_leases=keep_leases
        )
        if removed:
            log.info("removed network leftovers: %s", ", ".join(removed))
        for instance_id in keep:  # the rules again, should the host have lost them
            inst = self._instances[instance_id]
            lease = bridge.ipam.lease(instance_id)
            ip = lease.ip if lease is not None else inst.record.ip
            if ip is not None:
                await bridge.nat.add(instance_id, ip, inst.record.port_mappings)

    async def _unplug_quietly(self, inst: LocalInstance) -> None:
        try:
            await unplug(self.ctx, inst)
        except Exception as exc:
            self.ctx.oplog(inst, "could not release the network", level="WARN", error=exc)

    async def _reconcile(self, inst: LocalInstance) -> None:
        guest = inst.guest
        pid = guest.read_pid()
        spec = guest.read(guest.vm_spec, VmSpec) if guest.vm_spec.exists() else None
        if pid is not None and spec is not None:
            process = VmmProcess.adopt(
                pid, cmdline_must_contain=str(self.ctx.driver.api_socket(spec))
            )
            if process is not None:
                inst.process, inst.spec = process, spec
                await self._adopt(inst)
                return
        guest.write_pid(None)
        self._reconcile_without_vmm(inst)

    async def _adopt(self, inst: LocalInstance) -> None:
        """Take over a live VMM. A paused one was caught mid-standby by the worker's death:
        the guest goes on running (the redelivered standby will pause it again), and a
        half-written snapshot of a VM that still runs is worth nothing."""
        assert inst.process is not None and inst.spec is not None
        self.ctx.oplog(inst, "adopting running VMM", pid=inst.process.pid)
        state = await self._live_state(inst)
        if state is InstanceState.PAUSED:
            try:
                await self.ctx.driver.resume(inst.spec, inst.process)
                state = InstanceState.RUNNING
            except Exception as exc:
                self.ctx.oplog(inst, "could not resume adopted VMM", level="WARN", error=exc)
        if state is InstanceState.RUNNING and inst.guest.snapshot.exists():
            shutil.rmtree(inst.guest.snapshot.parent, ignore_errors=True)
        if state is not inst.state or inst.record.has_snapshot:
            self.ctx.set_state(inst, state, has_snapshot=inst.guest.has_snapshot())

    async def _live_state(self, inst: LocalInstance) -> InstanceState:
        assert inst.spec is not None and inst.process is not None
        try:
            return InstanceState(await self.ctx.driver.state(inst.spec, inst.process))
        except Exception as exc:
            self.ctx.set_state(inst, InstanceState.UNKNOWN, error=f"failed to query VMM: {exc}")
            return InstanceState.UNKNOWN

    def _reconcile_without_vmm(self, inst: LocalInstance) -> None:
        if inst.guest.has_snapshot():
            if inst.state is not InstanceState.STANDBY:
                self.ctx.set_state(inst, InstanceState.STANDBY, has_snapshot=True)
            return
        if inst.state in (InstanceState.STOPPED,):
            return
        # The record said the VM was up, but no VMM runs: it died while no worker watched.
        self.ctx.set_state(
            inst,
            InstanceState.STOPPED,
            error=f"VMM was gone when the worker started (record said {inst.state.value})",
            has_snapshot=False,
            stopped_at=_now(),
        )

    # -- helpers -----------------------------------------------------------------------------

    def _require(self, instance_id: str) -> LocalInstance:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise NotFound(f"instance {instance_id} not found")
        return inst

    def _lock(self, instance_id: str) -> anyio.Lock:
        return self._locks.setdefault(instance_id, anyio.Lock())


def _now() -> datetime:
    return datetime.now(UTC)
