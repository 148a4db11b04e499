"""setsnapshotschedule: the record takes the instance's snapshot schedule (None removes it);
``worker.snapshots.schedule`` runs it."""

from __future__ import annotations

from schemas.messages import SetSnapshotSchedule
from worker.lifecycle.context import LocalInstance, OpContext

__all__ = ["set_snapshot_schedule"]


async def set_snapshot_schedule(
    ctx: OpContext, inst: LocalInstance, cmd: SetSnapshotSchedule
) -> None:
    ctx.save(inst, snapshot_schedule=cmd.schedule)
