"""How checks are counted into a health status, and how a change of it reaches the state
subjects (a real NATS server): an event of kind ``health`` that leaves ``state`` alone."""

from __future__ import annotations

from datetime import timedelta

import anyio
import msgspec
import nats
import pytest

from natsbus import Layout, provision
from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.codec import decode_state_event
from schemas.messages import HealthCheckSpec, HealthState
from schemas.subjects import Subjects
from tests.support.gateway import instance_record
from worker.health import MAX_ERROR_CHARS, ProbeResult, judge
from worker.publisher import RecordPublisher

CHECK = HealthCheckSpec(
    type="tcp", port=80, start_period_s=30, failure_threshold=2, success_threshold=2
)
OK = ProbeResult(True)
FAILED = ProbeResult(False, "connection refused")


def _run(state: HealthState, results: list[ProbeResult], after_s: float) -> HealthState:
    """``results`` judged ``after_s`` seconds into the window, one second apart."""
    assert state.window_started_at is not None
    for n, result in enumerate(results):
        state = judge(
            state, CHECK, result, state.window_started_at + timedelta(seconds=after_s + n)
        )
    return state


def test_thresholds_decide_healthy_and_unhealthy() -> None:
    fresh = HealthState(window_started_at=utc_now())
    assert _run(fresh, [OK], 0).status == "starting"  # 1 of 2 successes
    healthy = _run(fresh, [OK, OK], 0)
    assert (healthy.status, healthy.consecutive_successes) == ("healthy", 2)
    once = _run(healthy, [FAILED], 40)
    assert (once.status, once.consecutive_failures, once.consecutive_successes) == (
        "healthy",
        1,
        0,
    )
    unhealthy = _run(healthy, [FAILED, FAILED], 40)
    assert unhealthy.status == "unhealthy" and unhealthy.last_error == "connection refused"
    back = _run(unhealthy, [OK, OK], 50)
    assert (back.status, back.consecutive_failures) == ("healthy", 0)
    assert back.last_success_at is not None and back.last_failure_at is not None


def test_failures_within_start_period_are_noted_but_never_counted() -> None:
    fresh = HealthState(window_started_at=utc_now())
    early = _run(fresh, [FAILED] * 10, 0)
    assert (early.status, early.consecutive_failures) == ("starting", 0)
    assert early.last_failure_at is not None and early.last_error == "connection refused"
    assert _run(early, [FAILED, FAILED], 30).status == "unhealthy"


def test_last_error_is_at_most_512_characters() -> None:
    state = judge(HealthState(), CHECK, ProbeResult(False, "x" * 2000), utc_now())
    assert state.last_error is not None and len(state.last_error) == MAX_ERROR_CHARS


def test_reported_status_follows_the_state() -> None:
    healthy = HealthState(status="healthy")
    assert healthy.status_in(InstanceState.RUNNING, True) == "healthy"
    assert healthy.status_in(InstanceState.INITIALIZING, True) == "starting"
    assert healthy.status_in(InstanceState.STOPPED, True) == "unknown"
    assert healthy.status_in(InstanceState.RUNNING, False) == "disabled"


@pytest.mark.anyio
async def test_a_health_change_is_an_event_on_the_state_subject(
    nats_url: str, subject_prefix: str
) -> None:
    subjects = Subjects(subject_prefix)
    nc = await nats.connect(nats_url)
    try:
        await provision(nc.jetstream(), subjects, Layout())
        record = msgspec.structs.replace(
            instance_record("i" + "1" * 23, "web", "h1"), health_check=CHECK
        )
        events = await nc.subscribe(subjects.state("h1", record.id))
        publisher = RecordPublisher(nc.jetstream(), subjects, "h1")
        async with anyio.create_task_group() as tg:
            await tg.start(publisher.run)
            publisher.changed(record, None)  # first sight: no event
            same = msgspec.structs.replace(record, last_command_id="x")
            publisher.changed(same, None)  # no change of health: no event
            healthy = msgspec.structs.replace(record, health=HealthState(status="healthy"))
            publisher.changed(healthy, None)
            await publisher.flush()
            publisher.stop()
        message = await events.next_msg(timeout=10)
        event = decode_state_event(message.data)
        assert (event.kind, event.health) == ("health", "healthy")
        assert event.previous == event.state == InstanceState.RUNNING
        with pytest.raises(nats.errors.TimeoutError):
            await events.next_msg(timeout=0.5)
    finally:
        await nc.close()
