"""delete: from any state; kill the VMM, release the volumes, remove the directory."""

from __future__ import annotations

import logging

from schemas.messages import Delete
from worker.lifecycle.context import LocalInstance, OpContext
from worker.lifecycle.network import release_network
from worker.network.ports import wait_until_released

__all__ = ["delete"]

log = logging.getLogger(__name__)


async def delete(ctx: OpContext, inst: LocalInstance, cmd: Delete) -> None:
    # 1. The VMM, if any: there is nothing to save, so no graceful shutdown.
    if inst.process is not None:
        await inst.process.kill_and_reap()
        inst.process = None
    # 2. Volume attachments, so the volumes can be attached elsewhere or deleted.
    for mount in inst.record.volumes:
        try:
            ctx.volumes.detach(mount.volume_id, inst.id)
        except Exception as exc:
            ctx.oplog(inst, "volume not released", level="ERROR", volume=mount.volume_id, error=exc)
    # 3. bridge mode: its TAP, rules and lease; user mode: the host ports the VMM held.
    try:
        await release_network(ctx, inst, record=False)
    except Exception as exc:
        ctx.oplog(inst, "could not release the network", level="WARN", error=exc)
    if ctx.bridge is None and not await wait_until_released(
        inst.record.port_mappings, ctx.network.publish_addr
    ):
        log.warning("instance %s deleted; the kernel still holds its host ports", inst.id)
    # 4. Every file of the instance, then the record.
    ctx.storage.remove_guest(inst.id)
    ctx.on_removed(inst.record)
