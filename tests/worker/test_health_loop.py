"""The worker's health loop against real sockets (no VM): a local web server stands in for
the guest's app, reached the way a worker reaches a guest in each networking mode, and
what the loop finds is what the instance's record (what the API shows) says."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, cast

import anyio
import msgspec
import pytest
from anyio.abc import SocketStream

from schemas.api import InstanceState, PortMapping
from schemas.clock import utc_now
from schemas.messages import HealthCheckSpec, HealthState, InstanceRecord
from tests.support.gateway import instance_record
from tests.worker.bootless import adopt, bootless_context, write_record
from worker.engine import HostEngine
from worker.health import supervise_health
from worker.health_probe import probe_target

pytestmark = pytest.mark.anyio

GUEST_PORT = 8080
ID = "h" + "1" * 23


class App:
    """A web server that answers every request with ``status`` (None: never answers)."""

    def __init__(self) -> None:
        self.status: int | None = 200
        self.requests = 0
        self.port = 0

    async def serve(self, stream: SocketStream) -> None:
        async with stream:
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    head += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            self.requests += 1
            if self.status is None:
                await anyio.sleep_forever()
            answer = f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            with suppress(anyio.BrokenResourceError):
                await stream.send(answer.encode())


@asynccontextmanager
async def app_and_loop(engine: HostEngine, app: App) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        app.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.start_soon(listener.serve, app.serve)
        yield
        tg.cancel_scope.cancel()


async def running_instance(
    engine: HostEngine, check: HealthCheckSpec, **fields: object
) -> InstanceRecord:
    record = write_record(
        engine.ctx,
        ID,
        state=InstanceState.RUNNING,
        health_check=check,
        health=HealthState(window_started_at=utc_now()),
        **fields,
    )
    adopt(engine, record)
    return record


async def wait_for(engine: HostEngine, ready: Callable[[InstanceRecord], bool]) -> InstanceRecord:
    with anyio.fail_after(20):
        while not ready(record := engine.get(ID)):
            await anyio.sleep(0.02)
    return record


def on_disk(engine: HostEngine) -> InstanceRecord:
    guest = engine.ctx.storage.guest(ID)
    return guest.read(guest.metadata, InstanceRecord)


def fast(kind: str, port: int = GUEST_PORT, **fields: Any) -> HealthCheckSpec:
    values: dict[str, Any] = {
        "interval_s": 0.05,
        "timeout_s": 0.5,
        "start_period_s": 0.0,
        "failure_threshold": 2,
    }
    values.update(fields)
    return HealthCheckSpec(type=cast(Any, kind), port=port, **values)


@pytest.fixture
def engine(tmp_path: Path) -> HostEngine:
    return HostEngine(bootless_context(tmp_path))


async def test_http_check_through_the_port_mapping_healthy_then_unhealthy(
    engine: HostEngine,
) -> None:
    app = App()
    writes: list[str | None] = []
    engine.ctx.on_transition = lambda inst, previous: writes.append(inst.record.health.status)
    async with app_and_loop(engine, app):
        mapping = PortMapping(guest_port=GUEST_PORT, host_port=app.port)
        await running_instance(engine, fast("http"), port_mappings=[mapping])
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: supervise_health(engine, tick_s=0.02))
            healthy = await wait_for(engine, lambda r: r.health.status == "healthy")
            assert healthy.health.last_success_at is not None
            assert on_disk(engine).health.status == "healthy"
            # Steady successes are counted, not written: one record write for the change.
            seen = app.requests
            with anyio.fail_after(20):
                while app.requests < seen + 10:
                    await anyio.sleep(0.02)
            assert writes == ["healthy"]

            app.status = 503
            unhealthy = await wait_for(engine, lambda r: r.health.status == "unhealthy")
            assert unhealthy.health.last_error == "GET /: status 503, expected 200"
            assert unhealthy.health.consecutive_failures == 2
            assert on_disk(engine).health.status == "unhealthy"

            app.status = 200
            back = await wait_for(engine, lambda r: r.health.status == "healthy")
            assert back.health.last_error is None  # a success clears it, as in hypeman
            tg.cancel_scope.cancel()
    # Written when the status or the error changed: the first failure's error (still
    # healthy, 1 of 2), unhealthy, healthy again; never once per check.
    assert writes == ["healthy", "healthy", "unhealthy", "healthy"]


async def test_tcp_check_of_a_closed_port_is_unhealthy(engine: HostEngine) -> None:
    async with anyio.create_task_group() as tg:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        closed = listener.extra(anyio.abc.SocketAttribute.local_port)
        await listener.aclose()  # nothing listens there any more
        mapping = PortMapping(guest_port=GUEST_PORT, host_port=closed)
        await running_instance(engine, fast("tcp"), port_mappings=[mapping])
        tg.start_soon(lambda: supervise_health(engine, tick_s=0.02))
        found = await wait_for(engine, lambda r: r.health.status == "unhealthy")
        tg.cancel_scope.cancel()
    assert found.health.last_error == f"connect to 127.0.0.1:{closed}: Connection refused"


async def test_an_app_that_never_answers_times_out(engine: HostEngine) -> None:
    app = App()
    app.status = None
    async with app_and_loop(engine, app):
        mapping = PortMapping(guest_port=GUEST_PORT, host_port=app.port)
        check = fast("http", timeout_s=0.2, failure_threshold=1)
        await running_instance(engine, check, port_mappings=[mapping])
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: supervise_health(engine, tick_s=0.02))
            found = await wait_for(engine, lambda r: r.health.status == "unhealthy")
            tg.cancel_scope.cancel()
    assert found.health.last_error == "timed out after 0.2s"


async def test_bridge_mode_probes_the_guest_address_not_a_mapping(engine: HostEngine) -> None:
    """In bridge mode the host routes to the guest: the probe goes to the instance's own
    address on the checked guest port (here the local app stands in for the guest)."""
    app = App()
    engine.ctx.bridge = cast(Any, object())  # a bridge-mode host (the loop only asks which)
    async with app_and_loop(engine, app):
        # A mapping of the checked port that leads nowhere: only the guest's ip:port counts.
        decoy = PortMapping(guest_port=app.port, host_port=1)
        check = fast("http", port=app.port)
        await running_instance(engine, check, ip="127.0.0.1", port_mappings=[decoy])
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: supervise_health(engine, tick_s=0.02))
            found = await wait_for(engine, lambda r: r.health.status == "healthy")
            tg.cancel_scope.cancel()
    assert found.health.last_error is None and app.requests >= 1


def test_probe_target_in_each_networking_mode() -> None:
    mapped = PortMapping(guest_port=80, host_port=18080)
    udp = PortMapping(guest_port=80, host_port=18081, protocol="udp")
    record = msgspec.structs.replace(
        instance_record(ID, "web", "h"),
        ip="10.100.0.7",
        port_mappings=[udp, mapped],
    )
    # bridge: the guest's own address and port, whatever is mapped.
    assert probe_target(record, 80, bridge=True, publish_addr="0.0.0.0") == ("10.100.0.7", 80)
    assert probe_target(record, 9000, bridge=True, publish_addr="") == ("10.100.0.7", 9000)
    with pytest.raises(OSError, match="no address"):
        probe_target(msgspec.structs.replace(record, ip=None), 80, bridge=True, publish_addr="")
    # user: the tcp mapping of that guest port, on the address the mappings listen on.
    assert probe_target(record, 80, bridge=False, publish_addr="0.0.0.0") == ("127.0.0.1", 18080)
    assert probe_target(record, 80, bridge=False, publish_addr="::") == ("::1", 18080)
    assert probe_target(record, 80, bridge=False, publish_addr="192.0.2.5") == (
        "192.0.2.5",
        18080,
    )
    with pytest.raises(OSError, match="no host port mapping"):
        probe_target(record, 443, bridge=False, publish_addr="127.0.0.1")


async def test_stopping_the_loop_leaves_no_probe_open(engine: HostEngine) -> None:
    """A worker shutting down mid-check closes its probes' connections (none lingers to
    answer into a loop that is gone)."""
    accepted = anyio.Event()
    closed = anyio.Event()

    async def silent(stream: SocketStream) -> None:
        async with stream:
            accepted.set()
            try:
                while True:
                    await stream.receive()  # the request, then nothing until the close
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                closed.set()

    async with anyio.create_task_group() as tg:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        tg.start_soon(listener.serve, silent)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        mapping = PortMapping(guest_port=GUEST_PORT, host_port=port)
        await running_instance(engine, fast("http", timeout_s=30), port_mappings=[mapping])
        with anyio.fail_after(20):
            async with anyio.create_task_group() as checks:
                checks.start_soon(lambda: supervise_health(engine, tick_s=0.02))
                await accepted.wait()
                checks.cancel_scope.cancel()
            await closed.wait()
        tg.cancel_scope.cancel()
