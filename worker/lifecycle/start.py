"""start: boot a stopped instance again; its overlay (the app's files) is kept."""

from __future__ import annotations

import anyio

from schemas.api import InstanceState
from schemas.messages import Start
from worker.lifecycle.boot import boot_to_running
from worker.lifecycle.context import LocalInstance, OpContext
from worker.lifecycle.create import publish_address
from worker.lifecycle.network import take_address, unplug
from worker.network import claim_host_ports
from worker.states import Op

__all__ = ["start"]


async def start(ctx: OpContext, inst: LocalInstance, cmd: Start) -> None:
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
    walk.advance()  # Created
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
            walk.fail(InstanceState.STOPPED, error=f"start failed: {exc}")
        raise
