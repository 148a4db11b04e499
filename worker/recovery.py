"""A worker's start: rebuild the instance table from disk and from the VMMs still running.

Each instance directory gives a record; a live VMM its pid file names is adopted (and
asked what state its VM is in); an instance whose VMM is gone is Standby if a snapshot
is on disk, else Stopped. VMMs no record accounts for are killed, and in bridge mode the
network is put back to what the instances need. So a worker restart loses nothing.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.errors import HypervisorError
from schemas.messages import InstanceRecord
from worker.drivers.base import VmSpec
from worker.lifecycle.context import LocalInstance, OpContext
from worker.lifecycle.exits import interrupted_restart
from worker.proc import VmmProcess, find_vmms
from worker.states import Event

__all__ = ["Recovered", "recover"]

log = logging.getLogger(__name__)


@dataclass
class Recovered:
    instances: dict[str, LocalInstance] = field(default_factory=dict)
    #: instance id -> the command a previous worker died in (its ``command`` mark).
    interrupted: dict[str, str] = field(default_factory=dict)


async def recover(ctx: OpContext) -> Recovered:
    """Rebuild the table from disk; adopt live VMMs; mark the dead ones."""
    found = Recovered()
    for guest in ctx.storage.existing():
        record = guest.read(guest.metadata, InstanceRecord)
        inst = LocalInstance(record=record, guest=guest)
        found.instances[record.id] = inst
        if (interrupted := guest.read_command()) is not None:
            found.interrupted[record.id] = interrupted
        await _reconcile(ctx, inst, interrupted)
    await _kill_unrecorded_vmms(ctx, found.instances)
    if ctx.bridge is not None:
        await _recover_network(ctx, found.instances)
    return found


async def _reconcile(ctx: OpContext, inst: LocalInstance, interrupted: str | None) -> None:
    guest = inst.guest
    pid = guest.read_pid()
    spec = guest.read(guest.vm_spec, VmSpec) if guest.vm_spec.exists() else None
    if pid is not None and spec is not None:
        process = VmmProcess.adopt(pid, cmdline_must_contain=str(ctx.driver.api_socket(spec)))
        if process is not None:
            inst.process, inst.spec = process, spec
            await _adopt(ctx, inst)
            return
    guest.write_pid(None)
    _reconcile_without_vmm(ctx, inst, interrupted)


async def _adopt(ctx: OpContext, inst: LocalInstance) -> None:
    """Take over a live VMM. A paused one was caught mid-standby by the worker's death:
    the guest goes on running (the redelivered standby will pause it again), and a
    half-written snapshot of a VM that still runs is worth nothing."""
    assert inst.process is not None and inst.spec is not None
    ctx.oplog(inst, "adopting running VMM", pid=inst.process.pid)
    state, error = await _live_state(ctx, inst)
    if state is InstanceState.PAUSED:
        try:
            await ctx.driver.resume(inst.spec, inst.process)
            state = InstanceState.RUNNING
        except Exception as exc:
            ctx.oplog(inst, "could not resume adopted VMM", level="WARN", error=exc)
    if state is InstanceState.RUNNING and inst.guest.snapshot.exists():
        shutil.rmtree(inst.guest.snapshot.parent, ignore_errors=True)
    has_snapshot = inst.guest.has_snapshot()
    if state is not inst.state:
        ctx.set_state(inst, state, cause=Event.ADOPTED, error=error, has_snapshot=has_snapshot)
    elif inst.record.has_snapshot or error:
        ctx.save(inst, state_error=error, has_snapshot=has_snapshot)


async def _live_state(ctx: OpContext, inst: LocalInstance) -> tuple[InstanceState, str | None]:
    """What the VMM says its VM is in, or Unknown and why."""
    assert inst.spec is not None and inst.process is not None
    try:
        return InstanceState(await ctx.driver.state(inst.spec, inst.process)), None
    except Exception as exc:
        return InstanceState.UNKNOWN, f"failed to query VMM: {exc}"


def _reconcile_without_vmm(ctx: OpContext, inst: LocalInstance, interrupted: str | None) -> None:
    if inst.guest.has_snapshot():
        if inst.state is not InstanceState.STANDBY:
            ctx.set_state(inst, InstanceState.STANDBY, cause=Event.RECOVERED, has_snapshot=True)
        return
    if inst.state is InstanceState.STOPPED:
        return
    # The record said the VM was up, but no VMM runs: it died while no worker watched.
    # A restart's boot cut short this way is still owed, once (worker.lifecycle.exits).
    now = utc_now()
    restart = interrupted_restart(inst.record, interrupted, now)
    ctx.set_state(
        inst,
        InstanceState.STOPPED,
        cause=Event.RECOVERED,
        error=f"VMM was gone when the worker started (record said {inst.state.value})",
        has_snapshot=False,
        stopped_at=now,
        restart=restart or inst.record.restart,
    )
    if restart is not None:
        ctx.oplog(inst, "restart interrupted by the worker's restart: scheduled again")


async def _kill_unrecorded_vmms(ctx: OpContext, instances: dict[str, LocalInstance]) -> None:
    """A VMM that no adopted pid file names was started by an operation the previous
    worker died in before recording it (create, start, restore: each is redone when its
    command is redelivered), or belongs to no instance: it must not run on beside the VMM
    the redone operation starts, so it is killed."""
    adopted = {inst.process.pid for inst in instances.values() if inst.process}
    for pid in set(find_vmms(ctx.storage.guests)) - adopted:
        process = VmmProcess.adopt(pid, cmdline_must_contain=f"{ctx.storage.guests}/")
        if process is not None:
            log.warning("killing VMM pid %d: no instance record accounts for it", pid)
            try:
                await process.kill_and_reap()
            except HypervisorError as exc:
                log.error("could not kill VMM pid %d: %s", pid, exc)


async def _recover_network(ctx: OpContext, instances: dict[str, LocalInstance]) -> None:
    """bridge mode: Running instances keep TAP, lease and rules; Standby ones keep lease
    and rules (their TAP comes back on restore); every other instance keeps its lease
    (its address is its own until deleted); everything else goes, including what
    instances that no longer exist left behind."""
    bridge = ctx.bridge
    assert bridge is not None
    keep: set[str] = set()
    keep_taps: set[str] = set()
    keep_leases: set[str] = set()
    for inst in instances.values():
        if not inst.record.network_enabled:
            continue
        keep_leases.add(inst.id)
        if inst.process is not None and inst.record.tap:
            keep.add(inst.id)
            keep_taps.add(inst.record.tap)
        elif inst.state is InstanceState.STANDBY and bridge.ipam.lease(inst.id) is not None:
            keep.add(inst.id)
    removed = await bridge.remove_leftovers(keep_taps=keep_taps, keep=keep, keep_leases=keep_leases)
    if removed:
        log.info("removed network leftovers: %s", ", ".join(removed))
    for instance_id in keep:  # the rules again, should the host have lost them
        inst = instances[instance_id]
        lease = bridge.ipam.lease(instance_id)
        ip = lease.ip if lease is not None else inst.record.ip
        if ip is not None:
            await bridge.nat.add(instance_id, ip, inst.record.port_mappings)
