"""Snapshot schedules: the owning worker takes each instance's scheduled snapshots and
enforces its retention.

A schedule lives in the instance's record (``snapshot_schedule``, set by the
``setsnapshotschedule`` command), so it moves and recovers with the instance. Every tick the
worker takes the snapshots that are due (kind Standby of a Running or Standby instance,
kind Stopped of a Stopped one; an instance in any other state is skipped with the reason in
``last_error``), then deletes the scheduled snapshots of that instance beyond ``max_count``
or older than ``max_age``. Only snapshots a schedule took are ever deleted by it.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import anyio
import msgspec

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.errors import VmfleetError
from schemas.messages import CreateSnapshot, InstanceRecord, SetSnapshotSchedule
from schemas.snapshots import ScheduleState, SnapshotKind, SnapshotManifest, scheduled_name
from worker.engine import HostEngine
from worker.snapshots.service import SnapshotService

__all__ = ["expired_snapshots", "run_schedules", "take_due"]

log = logging.getLogger(__name__)

_TICK_S = 1.0
_KINDS = {
    InstanceState.RUNNING: SnapshotKind.STANDBY,
    InstanceState.STANDBY: SnapshotKind.STANDBY,
    InstanceState.STOPPED: SnapshotKind.STOPPED,
}


async def run_schedules(
    engine: HostEngine, service: SnapshotService, *, tick_s: float = _TICK_S
) -> None:
    """Until cancelled: every tick, the due snapshots of every instance, one at a time."""
    while True:
        await take_due(engine, service, utc_now())
        await anyio.sleep(tick_s)


async def take_due(engine: HostEngine, service: SnapshotService, now: datetime) -> None:
    for record in list(engine.records()):
        schedule = record.snapshot_schedule
        if schedule is None or schedule.next_run_at > now:
            continue
        try:
            await _run_once(engine, service, record, schedule, now)
        except Exception as exc:  # one instance's failure must not stop the others'
            log.warning("snapshot schedule of %s: %s", record.id, exc)


async def _run_once(
    engine: HostEngine,
    service: SnapshotService,
    record: InstanceRecord,
    schedule: ScheduleState,
    now: datetime,
) -> None:
    snapshot_id, error = None, None
    kind = _KINDS.get(record.state)
    if kind is None:
        error = f"skipped: the instance is {record.state.value}"
    else:
        snapshot_id = f"{record.id[:40]}-s{int(now.timestamp() * 1000)}"
        try:
            await engine.execute(
                CreateSnapshot(
                    id=f"schedule-{snapshot_id}",
                    issued_at=now,
                    instance_id=record.id,
                    snapshot_id=snapshot_id,
                    kind=kind,
                    name=scheduled_name(schedule.name_prefix, now),
                    tags=dict(schedule.metadata),
                    scheduled=True,
                )
            )
            await service.publish(snapshot_id)
        except VmfleetError as exc:
            snapshot_id, error = None, str(exc)
    for manifest in expired_snapshots(service.owned_by(record.id), schedule, utc_now()):
        await service.delete(manifest.id)
    await _record_run(engine, record.id, now, snapshot_id, error)


def expired_snapshots(
    owned: list[SnapshotManifest], schedule: ScheduleState, now: datetime
) -> list[SnapshotManifest]:
    """The scheduled snapshots retention removes: beyond ``max_count`` (newest kept) or
    older than ``max_age``."""
    scheduled = sorted((m for m in owned if m.scheduled), key=lambda m: m.created_at, reverse=True)
    doomed = scheduled[schedule.max_count :] if schedule.max_count > 0 else []
    if schedule.max_age_s is not None:
        oldest = now - timedelta(seconds=schedule.max_age_s)
        doomed += [m for m in scheduled if m.created_at < oldest and m not in doomed]
    return doomed


async def _record_run(
    engine: HostEngine,
    instance_id: str,
    now: datetime,
    snapshot_id: str | None,
    error: str | None,
) -> None:
    """The run's outcome and the next run in the record (unless the schedule changed or
    went meanwhile)."""
    try:
        current = engine.get(instance_id).snapshot_schedule
    except VmfleetError:
        return  # deleted meanwhile
    if current is None:
        return
    updated = msgspec.structs.replace(
        current,
        last_run_at=now,
        last_snapshot_id=snapshot_id or current.last_snapshot_id,
        last_error=error,
        next_run_at=now + timedelta(seconds=current.interval_s),
    )
    await engine.execute(
        SetSnapshotSchedule(
            id=f"schedule-run-{instance_id}-{int(now.timestamp() * 1000)}",
            issued_at=utc_now(),
            instance_id=instance_id,
            schedule=updated,
        )
    )
