"""Standby then restore: the guest's processes and memory go on where they stopped."""

from __future__ import annotations

import re

import pytest

from schemas.api import InstanceState
from schemas.errors import InvalidState
from schemas.messages import Restore, Standby, Start
from tests.worker.conftest import create_command, now, wait_for_log
from worker.engine import HostEngine

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

COUNTER = 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.3; done'


def last_tick(log: str) -> int:
    ticks = re.findall(r"^tick (\d+)", log, re.MULTILINE)
    return int(ticks[-1]) if ticks else 0


async def test_counter_continues_across_standby(engine: HostEngine, busybox_image: str) -> None:
    cmd = create_command(busybox_image, cmd=["/bin/sh", "-c", COUNTER])
    await engine.execute(cmd)
    guest = engine.instance(cmd.instance_id).guest
    await wait_for_log(guest.app_log, "tick 5")

    record = await engine.execute(Standby(id="sb", instance_id=cmd.instance_id, issued_at=now()))
    assert record is not None
    assert (record.state, record.has_snapshot) == (InstanceState.STANDBY, True)
    assert engine.instance(cmd.instance_id).process is None
    before = last_tick(guest.app_log.read_text())

    with pytest.raises(InvalidState, match="cannot start from state Standby, must be Stopped"):
        await engine.execute(Start(id="st", instance_id=cmd.instance_id, issued_at=now()))

    record = await engine.execute(Restore(id="rs", instance_id=cmd.instance_id, issued_at=now()))
    assert record is not None
    assert (record.state, record.has_snapshot) == (InstanceState.RUNNING, False)
    assert not guest.snapshot.exists()
    await wait_for_log(guest.app_log, f"tick {before + 3}")
    ticks = [int(t) for t in re.findall(r"^tick (\d+)", guest.app_log.read_text(), re.MULTILINE)]
    # One counting process throughout: never restarted from 1, no value twice.
    assert ticks == list(range(1, len(ticks) + 1))
