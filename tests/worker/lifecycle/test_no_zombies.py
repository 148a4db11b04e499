"""Every VMM the worker started is reaped, whichever way it ended."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from schemas.messages import Delete, Restore, Standby, Start, Stop
from tests.worker.conftest import create_command, now, wait_for_log
from worker.engine import HostEngine

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

TICKER = 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.5; done'


def zombie_children(parent: int) -> list[int]:
    """Children of ``parent`` that exited and were never waited for (state Z)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


async def test_cycles_of_one_guest_leave_no_zombie(engine: HostEngine, busybox_image: str) -> None:
    cmd = create_command(busybox_image, cmd=["/bin/sh", "-c", TICKER])
    await engine.execute(cmd)
    instance_id = cmd.instance_id
    guest = engine.instance(instance_id).guest
    await wait_for_log(guest.app_log, "tick 1")
    for round_ in range(3):
        for op in (Standby, Restore, Stop, Start):
            record = await engine.execute(
                op(id=f"{op.__name__}-{round_}", instance_id=instance_id, issued_at=now())
            )
            assert record is not None
        assert zombie_children(os.getpid()) == []
    await engine.execute(Delete(id="del", instance_id=instance_id, issued_at=now()))

    assert zombie_children(os.getpid()) == []
