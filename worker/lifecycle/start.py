"""start: boot a stopped instance again; its overlay (the app's files) is kept.

A user's start clears the restart policy's block and counters and the last exit; an
automatic restart (``Start.restart``, sent by :mod:`worker.supervisor`) counts an attempt,
and does nothing unless the record still schedules it: a restart is taken once, however
many times it is sent.
"""

from __future__ import annotations

import anyio
import msgspec

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.messages import HealthState, RestartState, Start
from worker.lifecycle.boot import boot_to_running
from worker.lifecycle.context import LocalInstance, OpContext
from worker.lifecycle.create import publish_address
from worker.lifecycle.exits import after_exit
from worker.lifecycle.network import take_address, unplug
from worker.network import claim_host_ports
from worker.states import Op

__all__ = ["restart_due", "start"]


async def start(ctx: OpContext, inst: LocalInstance, cmd: Start) -> None:
    if cmd.restart and not restart_due(inst):
        ctx.oplog(inst, "scheduled restart no longer due: skipped", command=cmd.id)
        return
    # 1. Only a Stopped instance starts (a Standby one is restored instead).
    walk = ctx.walk(inst, Op.START)
    # 2. Overrides of the newer SDK's start call apply to this and later boots.
    if cmd.cmd is not None or cmd.entrypoint is not None:
        ctx.save(
            inst,
            cmd=cmd.cmd or inst.record.cmd,
            entrypoint=cmd.entrypoint or inst.record.entrypoint,
        )
    # 3. Its host ports are still free (something else may have bound one meanwhile).
    claim_host_ports(inst.record.port_mappings, set(), publish_address(ctx))
    # 4. The image (pulled again only if this host lost it), its address (bridge mode: its
    # own lease, kept since create; a new one only if the host lost it), a fresh config
    # disk, then boot.
    image = await ctx.pull_image(inst)
    take_address(ctx, inst)
    # Created: the last exit is history; the restart schedule is taken (written before the
    # boot, so that a worker dying in it does not take it again).
    # A fresh health window: failures of the last run say nothing about this one.
    walk.advance(
        exit_code=None,
        exit_message=None,
        restart=_restart_state(inst, cmd),
        health=HealthState(window_started_at=utc_now()),
    )
    try:
        await boot_to_running(ctx, walk, image)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            if inst.process is not None:
                await inst.process.kill_and_reap()
            inst.process = None
            inst.guest.write_pid(None)
            try:
                await unplug(ctx, inst)
            except Exception as undo_exc:
                ctx.oplog(inst, "start undo: network not released", level="ERROR", error=undo_exc)
            # A restart that cannot boot is one more failure for the policy.
            restart = after_exit(inst.record, None, utc_now()) if cmd.restart else None
            walk.fail(
                InstanceState.STOPPED,
                error=f"start failed: {exc}",
                restart=restart or inst.record.restart,
            )
        raise


def restart_due(inst: LocalInstance) -> bool:
    """Whether the record schedules an automatic restart now."""
    status = inst.record.restart
    return (
        inst.state is InstanceState.STOPPED
        and status.blocked_reason is None
        and status.next_attempt_at is not None
        and status.next_attempt_at <= utc_now()
    )


def _restart_state(inst: LocalInstance, cmd: Start) -> RestartState:
    if not cmd.restart:
        return RestartState()  # a user's start: no block, a new count
    status = inst.record.restart
    return msgspec.structs.replace(
        status, attempts=status.attempts + 1, last_attempt_at=utc_now(), next_attempt_at=None
    )
