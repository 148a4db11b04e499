"""phase_durations_ms / current_phase: the time a record spent in each state, as the
Instance reports it (hypeman 0.28's fields)."""

from __future__ import annotations

from datetime import timedelta

import msgspec

from schemas.api import InstanceState
from schemas.clock import utc_now
from tests.support.gateway import instance_record


def test_each_state_left_is_counted_and_the_current_one_is_live() -> None:
    start = utc_now() - timedelta(seconds=10)
    record = msgspec.structs.replace(
        instance_record("i" + "1" * 23, "web", "h1", state=InstanceState.CREATED),
        phase_since=start,
    )
    for state, seconds in ((InstanceState.INITIALIZING, 1), (InstanceState.RUNNING, 3)):
        at = (record.phase_since or start) + timedelta(seconds=seconds)
        record = msgspec.structs.replace(record, state=state, **record.entered(at))
    shown = record.to_api()
    assert shown.current_phase == "running"
    assert shown.current_phase_since == start + timedelta(seconds=4)
    assert isinstance(shown.phase_durations_ms, dict)
    assert shown.phase_durations_ms["created"] == 1000
    assert shown.phase_durations_ms["initializing"] == 3000
    assert shown.phase_durations_ms["running"] >= 6000  # still running: up to now


def test_a_record_without_phases_reports_none() -> None:
    shown = instance_record("i" + "2" * 23, "old", "h1").to_api()
    assert shown.phase_durations_ms is msgspec.UNSET and shown.current_phase is msgspec.UNSET
