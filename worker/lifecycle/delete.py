"""delete: from any state; kill the VMM, release the volumes, remove the directory."""

from __future__ import annotations

import contextlib

from schemas.messages import Delete
from worker.lifecycle.context import LocalInstance, OpContext
from worker.lifecycle.network import release_network

__all__ = ["delete"]


async def delete(ctx: OpContext, inst: LocalInstance, cmd: Delete) -> None:
    # 1. The VMM, if any: there is nothing to save, so no graceful shutdown.
    if inst.process is not None:
        await inst.process.kill_and_reap()
        inst.process = None
    # 2. Volume attachments, so the volumes can be attached elsewhere or deleted.
    for mount in inst.record.volumes:
        with contextlib.suppress(Exception):
            ctx.volumes.detach(mount.volume_id, inst.id)
    # 3. bridge mode: its TAP, rules and lease.
    try:
        await release_network(ctx, inst, record=False)
    except Exception as exc:
        ctx.oplog(inst, "could not release the network", level="WARN", error=exc)
    # 4. Every file of the instance, then the record.
    ctx.storage.remove_guest(inst.id)
    ctx.on_removed(inst.record)
