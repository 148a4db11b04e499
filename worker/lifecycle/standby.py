"""standby: pause, save the VM to the instance's snapshot directory, stop the VMM."""

from __future__ import annotations

import shutil

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.errors import HypervisorError
from schemas.messages import Standby
from worker.autostandby.policy import check_idle_standby
from worker.lifecycle.context import LocalInstance, OpContext
from worker.states import Op

__all__ = ["standby"]


async def standby(ctx: OpContext, inst: LocalInstance, cmd: Standby) -> None:
    # 1. Only a running VM with a hypervisor that can snapshot.
    walk = ctx.walk(inst, Op.STANDBY)
    if not ctx.driver.capabilities.snapshot:
        raise HypervisorError(f"{ctx.driver.name} cannot snapshot")
    if cmd.cause == "idle":
        # Sent by the auto-standby controller, maybe before a connection or a hold came:
        # decided again now that this holds the instance's lock.
        check_idle_standby(inst.record, utc_now(), in_session=ctx.inbound.in_session(inst.id))
    assert inst.process is not None and inst.spec is not None
    # 2. A fresh snapshot directory holding the device model the memory image belongs to.
    snapshot = inst.guest.snapshot
    shutil.rmtree(snapshot, ignore_errors=True)
    snapshot.mkdir(parents=True)
    inst.guest.write(snapshot / "vm.json", inst.spec)
    walk.advance(cause=cmd.cause)  # Paused; the cause names the standby in its events
    # 3. Pause + save + stop the VMM. A failure before the save resumes the VM.
    try:
        await ctx.driver.snapshot(inst.spec, inst.process, snapshot)
    except BaseException as exc:
        shutil.rmtree(snapshot, ignore_errors=True)
        running = inst.process.running()
        if not running:  # the VMM died under the snapshot: nothing of it is left to use
            inst.process = None
            inst.guest.write_pid(None)
        walk.fail(
            InstanceState.RUNNING if running else InstanceState.STOPPED,
            error=None if running else f"standby failed: {exc}",
        )
        raise
    # 4. The VMM is gone; the snapshot is the instance now. bridge mode: its TAP goes, its
    # lease and rules stay (restore brings back the same TAP, IP and MAC).
    inst.process = None
    inst.guest.write_pid(None)
    if ctx.bridge is not None and inst.record.tap:
        try:
            await ctx.bridge.remove_tap(inst.record.tap)
        except Exception as exc:
            ctx.oplog(inst, "could not remove the TAP", level="WARN", error=exc)
    walk.advance(has_snapshot=True, stopped_at=utc_now())  # Standby
