"""Health as a client of the API sees it, without a VM: a worker's real health loop and
record publisher (a local web server stands in for the guest's app) feed a real gateway,
whose ``GET /events`` carries each change of health and whose Instance reports it as
hypeman's SDK 0.28 types it, ``{"status": "disabled"}`` included."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from hypeman import AsyncHypeman
from hypeman.types import InstanceHealthStatus

from schemas.api import InstanceState, PortMapping
from schemas.clock import utc_now
from schemas.messages import HealthCheckSpec, HealthState
from tests.support.gateway import Bus, FakeHost, GatewayHandle
from tests.worker.bootless import adopt, bootless_context, write_record
from tests.worker.test_health_loop import App, app_and_loop
from worker.engine import HostEngine
from worker.health import supervise_health
from worker.publisher import RecordPublisher

pytestmark = pytest.mark.anyio

CHECKED = "c" + "1" * 23
PLAIN = "c" + "2" * 23
STOPPED = "c" + "3" * 23
CHECK = HealthCheckSpec(
    type="http", port=8080, interval_s=0.05, timeout_s=0.5, start_period_s=0, failure_threshold=2
)


async def _data_events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, object]]:
    async for raw in lines:
        if raw.startswith("data: "):
            yield json.loads(raw.removeprefix("data: "))


async def test_health_changes_reach_events_and_the_instance(
    gw: GatewayHandle, bus: Bus, subject_prefix: str, tmp_path: Path
) -> None:
    engine = HostEngine(bootless_context(tmp_path))
    publisher = RecordPublisher(bus.js, bus.subjects, engine.ctx.host_id)
    engine.ctx.on_transition = lambda inst, previous: publisher.changed(inst.record, previous)
    sdk = AsyncHypeman(api_key=gw.token, base_url=gw.base_url, max_retries=0)
    app = App()
    async with anyio.create_task_group() as tg, app_and_loop(engine, app):
        # The host heartbeats (else the gateway reports its instances Unknown).
        await tg.start(FakeHost(bus.nc, subject_prefix, engine.ctx.host_id).run)
        await tg.start(publisher.run)
        try:
            _publish_instances(engine, publisher, app.port)
            await publisher.flush()
            await _instances_report_health_status(sdk)
            before = (await bus.js.stream_info(bus.subjects.states_stream)).state.last_seq
            tg.start_soon(lambda: supervise_health(engine, tick_s=0.02))
            await _health_changes_on_events(gw, app, after=before)
            status = await _until_unhealthy(sdk)
            assert status.last_error == "GET /: status 503, expected 200"
            assert status.consecutive_failures >= 2
        finally:
            publisher.stop()  # its run is shielded: it ends only when told
            tg.cancel_scope.cancel()
    await sdk.close()


def _publish_instances(engine: HostEngine, publisher: RecordPublisher, app_port: int) -> None:
    """A checked Running instance (its app on ``app_port``), one without a check, and a
    Stopped one with a check, as a starting worker publishes them."""
    opened = HealthState(window_started_at=utc_now())
    mapping = PortMapping(guest_port=8080, host_port=app_port)
    ctx = engine.ctx
    for record in (
        write_record(ctx, CHECKED, health_check=CHECK, health=opened, port_mappings=[mapping]),
        write_record(ctx, PLAIN),
        write_record(ctx, STOPPED, state=InstanceState.STOPPED, health_check=CHECK, health=opened),
    ):
        publisher.changed(adopt(engine, record).record, None)


async def _instances_report_health_status(sdk: AsyncHypeman) -> None:
    with anyio.fail_after(20):
        while len(await sdk.instances.list()) < 3:
            await anyio.sleep(0.05)
    plain = (await sdk.instances.get(PLAIN)).health_status
    assert plain is not None and plain.status == "disabled"
    assert (plain.consecutive_failures, plain.consecutive_successes) == (0, 0)
    assert plain.last_checked_at is None and plain.last_error is None
    stopped = (await sdk.instances.get(STOPPED)).health_status
    assert stopped is not None and stopped.status == "unknown"
    starting = (await sdk.instances.get(CHECKED)).health_status
    assert starting is not None and starting.status == "starting"


async def _health_changes_on_events(gw: GatewayHandle, app: App, *, after: int) -> None:
    """Healthy, then unhealthy once the app answers 503: each a ``health`` event."""
    async with (
        gw.async_client() as client,
        client.stream(
            "GET", "/events", params={"instance": CHECKED}, headers={"Last-Event-ID": str(after)}
        ) as response,
    ):
        events = _data_events(response.aiter_lines())
        with anyio.fail_after(20):
            healthy = await anext(events)
        assert (healthy["kind"], healthy["health"]) == ("health", "healthy")
        assert healthy["state"] == healthy["previous"] == "Running"
        assert healthy["instance_id"] == CHECKED

        app.status = 503
        with anyio.fail_after(20):
            unhealthy = await anext(events)
        assert (unhealthy["kind"], unhealthy["health"]) == ("health", "unhealthy")
        assert unhealthy["state"] == "Running"  # health never changes the state


async def _until_unhealthy(sdk: AsyncHypeman) -> InstanceHealthStatus:
    with anyio.fail_after(20):
        while True:
            status = (await sdk.instances.get(CHECKED)).health_status
            if status is not None and status.status == "unhealthy":
                return status
            await anyio.sleep(0.05)
