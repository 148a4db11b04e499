"""restore: start a VMM with the device model saved at standby and resume the guest."""

from __future__ import annotations

import contextlib
import functools
import shutil
import time

import anyio

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.errors import Conflict
from schemas.messages import HealthState, Restore
from worker.drivers.base import VmSpec
from worker.guest.control import GuestControlError, guest_request
from worker.lifecycle.context import LocalInstance, OpContext
from worker.lifecycle.network import plug
from worker.states import Op

__all__ = ["restore"]


async def restore(ctx: OpContext, inst: LocalInstance, cmd: Restore) -> None:
    # 1. Only from Standby, and only with a snapshot to restore.
    walk = ctx.walk(inst, Op.RESTORE)
    steps = _Steps()
    snapshot = inst.guest.snapshot
    if not inst.guest.has_snapshot():
        raise Conflict("instance has no snapshot to restore", code="invalid_state")
    spec = inst.guest.read(snapshot / "vm.json", VmSpec)
    asleep_by = inst.record.cause  # what put it to sleep, again its cause if this fails
    walk.advance(cause=cmd.cause)  # Paused; the cause names the wake in its events
    # 2. The same devices (bridge mode: the TAP the snapshot names, on the same lease), then
    # the saved memory, then continue. While the worker holds the instance's mapped ports
    # (it sleeps by its policy), the VMM starts without taking them (worker.wake).
    launch = ctx.wake.launch_spec(inst.id, spec, cmd.cause) if ctx.wake else spec
    try:
        for nic in spec.nics:
            if nic.mode == "tap":
                await plug(ctx, inst, nic.tap)
        steps.done("plug")
        inst.process = await ctx.driver.restore(launch, snapshot, vmm_log=inst.guest.vmm_log)
        steps.done("vmm")
    except BaseException as exc:
        if ctx.bridge is not None and inst.record.tap:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await ctx.bridge.remove_tap(inst.record.tap)
        inst.process = None  # the driver killed the new VMM; the snapshot is still there
        inst.guest.write_pid(None)
        # Asleep for the same reason as before.
        walk.fail(InstanceState.STANDBY, error=f"restore failed: {exc}", cause=asleep_by)
        if ctx.wake:
            ctx.wake.restore_failed(inst.id, str(exc))
        raise
    inst.spec = spec
    # The guest runs: Running, in a fresh health window (the snapshot, if the worker died
    # now, is still there and the pid file not written: the next worker finds Standby).
    now = utc_now()
    walk.advance(has_snapshot=False, started_at=now, health=HealthState(window_started_at=now))
    steps.done("record")
    # Connections a wake holds need nothing more: they are answered before the worker
    # writes more files (fsyncs on the event loop) and resyncs the guest's clock (it
    # competes with them for the guest's CPU).
    if ctx.wake:
        ctx.wake.vm_running(inst.id)
        await ctx.wake.settled(inst.id)
        steps.done("answered")
    inst.guest.write(inst.guest.vm_spec, spec)
    inst.guest.write_pid(inst.process.pid)
    # 3. The snapshot has served; hypeman deletes it too (in a thread: freeing a memory
    # file's pages takes a while).
    await anyio.to_thread.run_sync(functools.partial(shutil.rmtree, snapshot, ignore_errors=True))
    steps.done("files")
    # 4. The guest's clock stood still during standby.
    await _resync_clock(ctx, inst, spec)
    steps.done("clock")
    ctx.oplog(inst, f"restore steps {steps}", cause=cmd.cause)


class _Steps:
    """How long each step of a restore took (the ops log line says where a slow one went:
    plug = TAP and rules, vmm = the VMM's spawn, loading the memory and continuing it,
    record = the Running record, answered = a wake's first answer, files = the device
    model and pid files and the snapshot's removal, clock = the guest's clock resync)."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self._steps: list[str] = []

    def done(self, step: str) -> None:
        now = time.monotonic()
        self._steps.append(f"{step}={(now - self._last) * 1000:.0f}ms")
        self._last = now

    def __str__(self) -> str:
        return " ".join(self._steps)


async def _resync_clock(ctx: OpContext, inst: LocalInstance, spec: VmSpec) -> None:
    try:
        await guest_request(
            ctx.driver.control_socket(spec),
            f"settime {int(utc_now().timestamp())}",
            timeout_s=10,
        )
    except GuestControlError as exc:
        ctx.oplog(inst, "could not resync the guest clock", level="WARN", error=exc)
