"""The controller's idle clock, standby, hold and status, on an engine stand-in (the
connections come from the registry the wake listener reports to; the kernel's table is
read for real and has none of these instances' ports)."""

from __future__ import annotations

from datetime import timedelta

import anyio
import msgspec
import pytest

from schemas.api import InstanceState
from schemas.autostandby import AutoStandbySpec
from schemas.clock import utc_now
from tests.worker.autostandby.double import EngineDouble, record
from worker.autostandby.controller import AutoStandbyController, InstanceInStandby
from worker.autostandby.registry import InboundRegistry

pytestmark = pytest.mark.anyio

POLICY = AutoStandbySpec(enabled=True, idle_timeout="10s", idle_timeout_s=10.0)


def _controller(*records: object) -> tuple[EngineDouble, InboundRegistry, AutoStandbyController]:
    engine = EngineDouble()
    for r in records:
        engine.add(r)  # type: ignore[arg-type]
    inbound = InboundRegistry()
    # The tests tick by hand, at the times they choose; the loop only owns the standbys.
    controller = AutoStandbyController(engine.as_engine(), inbound, bridge=False, interval_s=3600)
    return engine, inbound, controller


async def test_idle_for_the_timeout_goes_to_standby_with_cause_idle() -> None:
    engine, _, controller = _controller(record("a", auto_standby=POLICY))
    start = utc_now() - timedelta(seconds=20)  # the standby checks the real clock again
    async with anyio.create_task_group() as tg:
        await tg.start(controller.run)
        await controller.tick(start)
        stamped = engine.get("a").idle.idle_since
        assert stamped == start
        status = controller.status("a", start + timedelta(seconds=4))
        assert (status.status, status.reason) == ("idle_countdown", "idle_timeout_not_elapsed")
        assert status.countdown_remaining == "6s" and status.idle_timeout == "10s"
        assert status.next_standby_at == start + timedelta(seconds=10)
        await controller.tick(start + timedelta(seconds=10))
        with anyio.fail_after(5):
            while engine.get("a").state is not InstanceState.STANDBY:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert engine.get("a").cause == "idle"
    assert [c.cause for c in engine.executed] == ["idle"]  # type: ignore[attr-defined]


async def test_a_held_connection_keeps_it_active_and_resets_the_clock() -> None:
    engine, inbound, controller = _controller(record("a", auto_standby=POLICY))
    start = utc_now()
    await controller.tick(start)
    inbound.opened("a", 8080, "192.0.2.7", 40000)
    await controller.tick(start + timedelta(seconds=60))
    status = controller.status("a", start + timedelta(seconds=60))
    assert (status.status, status.reason) == ("active", "active_inbound_connections")
    assert status.active_inbound_connections == 1
    assert status.last_inbound_activity_at == start + timedelta(seconds=60)
    assert engine.get("a").idle.idle_since is None
    assert engine.executed == []
    inbound.closed("a", 8080, "192.0.2.7", 40000)
    await controller.tick(start + timedelta(seconds=61))
    assert engine.get("a").idle.idle_since == start + timedelta(seconds=61)


async def test_hold_postpones_and_cancels_a_queued_standby() -> None:
    engine, _, controller = _controller(record("a", auto_standby=POLICY))
    start = utc_now() - timedelta(seconds=30)
    async with anyio.create_task_group() as tg:
        await tg.start(controller.run)
        async with engine.lock:  # a user's command holds the instance
            await controller.tick(start)
            await controller.tick(utc_now())  # due: the standby is queued behind the lock
            queued = controller.status("a")
            assert (queued.status, queued.reason) == ("standby_requested", "ready_for_standby")
            held = controller.hold("a")
            assert held.hold_until is not None and held.next_standby_at == held.hold_until
            assert held.status == "idle_countdown"
        with anyio.fail_after(5):
            while not engine.executed or controller.queued():
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    # The queued standby found the hold once it held the lock, and stood down.
    assert engine.get("a").state is InstanceState.RUNNING
    newer = controller.hold("a")
    assert newer.hold_until is not None and newer.hold_until >= held.hold_until


async def test_hold_in_standby_is_409_and_elsewhere_the_current_status() -> None:
    engine, _, controller = _controller(
        record("sleeping", auto_standby=POLICY, state=InstanceState.STANDBY, has_snapshot=True),
        record("entering", auto_standby=POLICY, state=InstanceState.PAUSED),
        record("nopolicy"),
        record("stopped", auto_standby=POLICY, state=InstanceState.STOPPED),
    )
    for name in ("sleeping", "entering"):
        with pytest.raises(InstanceInStandby):
            controller.hold(name)
    bare = controller.hold("nopolicy")
    assert (bare.status, bare.reason, bare.configured) == ("disabled", "policy_missing", False)
    stopped = controller.hold("stopped")
    assert (stopped.status, stopped.reason) == ("ineligible", "instance_not_running")
    assert stopped.hold_until is msgspec.UNSET
    assert engine.ctx.saves == 0  # nothing changed


async def test_no_network_is_ineligible_and_never_stands_by() -> None:
    engine, _, controller = _controller(
        record("a", auto_standby=POLICY, network_enabled=False, ip=None)
    )
    await controller.tick(utc_now() - timedelta(hours=1))
    await controller.tick(utc_now())
    status = controller.status("a")
    assert (status.status, status.reason, status.eligible) == (
        "ineligible",
        "network_disabled",
        False,
    )
    assert engine.executed == [] and engine.ctx.saves == 0


async def test_a_start_after_the_clock_was_stamped_begins_it_again() -> None:
    stale = utc_now() - timedelta(hours=1)
    started = utc_now() - timedelta(seconds=2)
    engine, _, controller = _controller(record("a", auto_standby=POLICY, started_at=started))
    engine.ctx.save(engine.instance("a"), idle=engine.get("a").idle.__class__(idle_since=stale))
    status = controller.status("a")
    assert status.idle_since == started
    assert status.next_standby_at == started + timedelta(seconds=10)


async def test_an_open_exec_session_defers_the_standby() -> None:
    engine, inbound, controller = _controller(record("a", auto_standby=POLICY))
    start = utc_now() - timedelta(seconds=30)
    inbound.session_changed("a", 1)
    async with anyio.create_task_group() as tg:
        await tg.start(controller.run)
        await controller.tick(start)
        await controller.tick(utc_now())
        assert engine.executed == [] and not controller.queued()
        inbound.session_changed("a", -1)
        await controller.tick(utc_now())
        with anyio.fail_after(5):
            while engine.get("a").state is not InstanceState.STANDBY:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()


async def test_a_new_worker_keeps_the_countdown_from_the_record() -> None:
    engine, inbound, before = _controller(record("a", auto_standby=POLICY))
    stamped = utc_now() - timedelta(seconds=4)
    await before.tick(stamped)
    # The worker restarts: a new controller, the same records.
    after = AutoStandbyController(engine.as_engine(), inbound, bridge=False)
    await after.tick(stamped + timedelta(seconds=4))
    status = after.status("a", stamped + timedelta(seconds=4))
    assert status.idle_since == stamped and status.countdown_remaining == "6s"
