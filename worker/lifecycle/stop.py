"""stop: the app gets SIGTERM and time to exit, then the VM powers off; never a leftover VMM."""

from __future__ import annotations

from datetime import datetime

import anyio
import msgspec

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.messages import RestartState, Stop
from worker.guest.control import GuestControlError, guest_request
from worker.lifecycle.context import LocalInstance, OpContext
from worker.lifecycle.exits import after_exit, note_decision
from worker.lifecycle.network import unplug
from worker.states import Op

__all__ = ["health_restart_due", "stop", "stop_vmm"]


async def stop(ctx: OpContext, inst: LocalInstance, cmd: Stop) -> None:
    if cmd.restart_reason is not None and not health_restart_due(inst):
        ctx.oplog(inst, "health restart no longer due: skipped", command=cmd.id)
        return
    walk = ctx.walk(inst, Op.STOP)
    # Decided while still Running (a run longer than stable_after starts a new count).
    health_restart = _health_restart(inst, utc_now()) if cmd.restart_reason else None
    walk.advance()  # Shutdown: the guest is asked to power off; its VMM still exists
    await stop_vmm(ctx, inst)
    try:
        # bridge mode: the TAP and rules go; the address stays the instance's (start
        # reuses it).
        await unplug(ctx, inst)
    finally:
        # Stopped: the VMM is gone either way. A user's stop blocks automatic restarts
        # until the next start; the health checks' stop schedules the restart instead,
        # in the same write (worker.supervisor takes it when due).
        restart = health_restart or _blocked(inst)
        walk.advance(stopped_at=utc_now(), restart=restart)
        if health_restart is not None:
            note_decision(ctx, inst, health_restart)


def health_restart_due(inst: LocalInstance) -> bool:
    """Whether the health checks' stop still applies: a Running, unhealthy instance whose
    policy restarts on failure and would schedule a restart now (one that ran out of
    attempts keeps running, unhealthy, rather than being stopped for good)."""
    record = inst.record
    policy = record.restart_policy
    return (
        record.state is InstanceState.RUNNING
        and record.health_check is not None
        and record.health.status == "unhealthy"
        and policy is not None
        and policy.policy == "on_failure"
        and after_exit(record, None, utc_now()).next_attempt_at is not None
    )


def _health_restart(inst: LocalInstance, now: datetime) -> RestartState:
    """The policy's decision for an unhealthy program: like an exit of unknown cause."""
    decided = after_exit(inst.record, None, now)
    return msgspec.structs.replace(decided, last_reason="health_check_failed")


def _blocked(inst: LocalInstance) -> RestartState:
    status = inst.record.restart
    if inst.record.restart_policy is None:
        return status
    return msgspec.structs.replace(status, blocked_reason="manual_stop", next_attempt_at=None)


async def stop_vmm(ctx: OpContext, inst: LocalInstance) -> None:
    """Stop the guest as gently as it allows, as hard as needed; the VMM is reaped."""
    process, spec = inst.process, inst.spec
    if process is not None and spec is not None:
        grace = ctx.timeouts.stop_grace_s
        # 1. Through the guest's init: SIGTERM the app, wait, sync, power off.
        try:
            await guest_request(
                ctx.driver.control_socket(spec), f"shutdown {int(grace)}", timeout_s=5
            )
            exited = await process.wait_for(grace + 10)
        except GuestControlError as exc:
            ctx.oplog(inst, "guest did not take the shutdown request", level="WARN", error=exc)
            exited = False
        # 2. ACPI power button, then 3. SIGKILL.
        if not exited and not await ctx.driver.power_off(spec, process, timeout_s=5):
            ctx.oplog(inst, "guest did not power off; killing the VMM", level="WARN")
            await process.kill_and_reap()
        with anyio.CancelScope(shield=True):
            await process.wait()
    inst.process = None
    inst.guest.write_pid(None)
