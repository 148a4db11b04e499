"""One parent guest and one fork on a host's engine (two guests): the parent's snapshot
schedule takes a snapshot each time it is due and keeps max_count of them; a snapshot of
kind Stopped (disks only) forks into an instance that boots with the parent's files; a stop
and start of that fork boots from its own copy-on-write layer again."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

from schemas.api import InstanceState
from schemas.messages import CreateSnapshot, SetSnapshotSchedule, Start, Stop
from schemas.snapshots import ForkSource, ScheduleState, SnapshotKind
from tests.worker.conftest import create_command, now, wait_for_log
from worker.engine import HostEngine
from worker.snapshots.capture import snapshot_store
from worker.snapshots.schedule import take_due
from worker.snapshots.service import SnapshotService

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

# The first boot writes a file; a boot that finds it says so.
APP = (
    'if [ -f /data.txt ]; then echo "found $(cat /data.txt)"; '
    'else echo parent-wrote > /data.txt; sync; echo "wrote it"; fi; exec sleep 100000'
)


async def test_schedule_retention_then_a_fork_of_the_disks(
    engine: HostEngine, busybox_image: str
) -> None:
    parent = create_command(busybox_image, cmd=["/bin/sh", "-c", APP], name="parent")
    await engine.execute(parent)
    guest = engine.instance(parent.instance_id).guest
    await wait_for_log(guest.app_log, "wrote it")

    # A schedule due three times keeps the two newest of its snapshots.
    service = SnapshotService(snapshot_store(engine.ctx), None, engine.ctx.host_id)
    start = now()
    schedule = ScheduleState(
        interval_s=60, max_count=2, created_at=start, updated_at=start, next_run_at=start
    )
    await engine.execute(
        SetSnapshotSchedule(
            id="sched", issued_at=start, instance_id=parent.instance_id, schedule=schedule
        )
    )
    for minutes in (1, 3, 5):
        await take_due(engine, service, start + timedelta(minutes=minutes))
    kept = sorted(service.owned_by(parent.instance_id), key=lambda m: m.created_at)
    assert [m.scheduled for m in kept] == [True, True]
    record = engine.get(parent.instance_id)
    assert record.state is InstanceState.RUNNING
    assert record.snapshot_schedule is not None
    assert record.snapshot_schedule.last_snapshot_id == kept[-1].id
    assert record.snapshot_schedule.last_error is None

    # Disks only, of the stopped parent; the fork boots with the parent's file.
    await engine.execute(Stop(id="stop", instance_id=parent.instance_id, issued_at=now()))
    await engine.execute(
        CreateSnapshot(
            id="cold",
            issued_at=now(),
            instance_id=parent.instance_id,
            snapshot_id="cold",
            kind=SnapshotKind.STOPPED,
        )
    )
    fork = msgspec.structs.replace(
        create_command(busybox_image, cmd=["/bin/sh", "-c", APP], name="fork"),
        fork=ForkSource(snapshot_id="cold", target_state="Running"),
    )
    made = await engine.execute(fork)
    assert made is not None and made.state is InstanceState.RUNNING
    fork_guest = engine.instance(fork.instance_id).guest
    await wait_for_log(fork_guest.app_log, "found parent-wrote")

    # Its own layer survives a stop and start.
    await engine.execute(Stop(id="fstop", instance_id=fork.instance_id, issued_at=now()))
    size = fork_guest.app_log.stat().st_size
    await engine.execute(Start(id="fstart", instance_id=fork.instance_id, issued_at=now()))
    await wait_for_log(fork_guest.app_log, "found parent-wrote", after=size)
    spec = engine.instance(fork.instance_id).spec
    assert spec is not None
    overlay = next(d for d in spec.disks if d.id == "overlay")
    assert overlay.format == "qcow2" and "/disks/" in overlay.path
