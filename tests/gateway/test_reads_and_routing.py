"""Reads come from the watched view; ``{id}`` resolves like hypeman's; commands go to the
owning host, or are refused (503) when it is not live, or time out (504) and stay queued.

Records are written straight into the buckets, as a worker would, so no VM is needed.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import anyio
import httpx
import nats
import pytest

from schemas.api import InstanceState
from schemas.messages import VolumeRecord
from tests.support.gateway import (
    Bus,
    FakeHost,
    GatewayHandle,
    host_record,
    instance_record,
    running_gateway,
)

pytestmark = pytest.mark.anyio

A = "a" + "1" * 23
B = "a" + "2" * 23
C = "b" + "3" * 23


async def _until(client: httpx.AsyncClient, path: str, status: int) -> httpx.Response:
    """The view catches up within milliseconds; a test does not assume how many."""
    with anyio.fail_after(10):
        while (response := await client.get(path)).status_code != status:
            await anyio.sleep(0.02)
    return response


async def _seed(bus: Bus, *, host_alive: bool = True) -> None:
    s = bus.subjects
    if host_alive:
        await bus.put(s.hosts_bucket, "h1", host_record("h1"))
    await bus.put(s.instances_bucket, A, instance_record(A, "web", "h1"))
    await bus.put(s.instances_bucket, B, instance_record(B, "twin", "h1"))
    await bus.put(s.instances_bucket, C, instance_record(C, "twin", "h1"))


async def test_resolution_by_id_name_and_prefix(gw: GatewayHandle, bus: Bus) -> None:
    await _seed(bus)
    async with gw.async_client() as client:
        await _until(client, f"/instances/{C}", 200)
        assert (await client.get(f"/instances/{A}")).json()["id"] == A
        assert (await client.get("/instances/web")).json()["id"] == A
        assert (await client.get("/instances/b3")).json()["id"] == C
        for ambiguous in ("twin", "a"):
            response = await client.get(f"/instances/{ambiguous}")
            assert response.status_code == 409
            assert response.json() == {
                "code": "ambiguous",
                "message": "multiple resources match, use full ID",
            }
            assert response.headers["x-should-retry"] == "false"
        listed = (await client.get("/instances")).json()
        assert [i["id"] for i in listed] == [A, B, C]
        assert all(i["host"] == "h1" and i["state"] == "Running" for i in listed)
        assert listed[0]["started_at"] is None and listed[0]["state_error"] is None
        stopped = (await client.get("/instances?state=Stopped")).json()
        assert stopped == []


async def test_deletes_and_undecodable_values_leave_the_view(gw: GatewayHandle, bus: Bus) -> None:
    await _seed(bus)
    s = bus.subjects
    async with gw.async_client() as client:
        await _until(client, f"/instances/{C}", 200)
        await bus.delete(s.instances_bucket, A)
        await _until(client, f"/instances/{A}", 404)
        await bus.put(s.instances_bucket, B, b"still here")  # not a record: left out
        await _until(client, f"/instances/{B}", 404)
        assert [i["id"] for i in (await client.get("/instances")).json()] == [C]
        assert (await client.get("/instances/twin")).json()["id"] == C


async def test_command_to_a_host_that_is_not_live_is_refused(gw: GatewayHandle, bus: Bus) -> None:
    await _seed(bus, host_alive=False)
    async with gw.async_client() as client:
        await _until(client, f"/instances/{A}", 200)
        response = await client.post(f"/instances/{A}/stop")
    assert response.status_code == 503
    assert response.json()["code"] == "host_unavailable"
    info = await bus.js.stream_info(bus.subjects.commands_stream)
    assert info.state.messages == 0  # nothing was sent


@pytest.fixture
async def impatient(nats_url: str) -> AsyncIterator[tuple[GatewayHandle, Bus]]:
    prefix = "q" + secrets.token_hex(4)
    with running_gateway(nats_url, prefix, command_timeout_s=1.0) as handle:
        nc = await nats.connect(nats_url)
        try:
            yield handle, Bus(nc, prefix)
        finally:
            await nc.close()


async def test_silent_host_gives_504_and_the_command_stays_queued(
    impatient: tuple[GatewayHandle, Bus],
) -> None:
    gw, bus = impatient
    s = bus.subjects
    async with anyio.create_task_group() as tg:
        await tg.start(FakeHost(bus.nc, s.prefix, "mute").run)  # beats, never answers a stop
        await bus.put(s.instances_bucket, A, instance_record(A, "web", "mute"))
        async with gw.async_client() as client:
            await _until(client, f"/instances/{A}", 200)
            response = await client.post(f"/instances/{A}/stop", headers={"Idempotency-Key": "k1"})
        assert response.status_code == 504
        assert response.json()["code"] == "host_unavailable"
        assert "stays queued" in response.json()["message"]
        assert response.headers["x-should-retry"] == "true"
        queued = await bus.js.get_last_msg(s.commands_stream, s.command("mute", "stop"))
        assert queued.headers is not None and queued.headers["Nats-Msg-Id"] == "k1"
        tg.cancel_scope.cancel()


async def test_hosts_come_from_heartbeats_and_age_out(nats_url: str) -> None:
    from natsbus import Layout

    prefix = "t" + secrets.token_hex(4)
    with running_gateway(nats_url, prefix, layout=Layout(host_ttl_s=1.5)) as gw:
        nc = await nats.connect(nats_url)
        try:
            bus = Bus(nc, prefix)
            await bus.put(bus.subjects.hosts_bucket, "h9", host_record("h9"))
            async with gw.async_client() as client:
                with anyio.fail_after(10):
                    while [h["id"] for h in (await client.get("/hosts")).json()] != ["h9"]:
                        await anyio.sleep(0.02)
                with anyio.fail_after(10):  # no delete marker arrives: the view expires it
                    while (await client.get("/hosts")).json():
                        await anyio.sleep(0.1)
        finally:
            await nc.close()


async def test_volume_resolution_and_attached_volume_is_kept(gw: GatewayHandle, bus: Bus) -> None:
    from datetime import UTC, datetime

    from schemas.api import VolumeAttachment

    s = bus.subjects
    now = datetime.now(UTC)
    attached = [VolumeAttachment(instance_id=A, mount_path="/data", readonly=False)]
    await bus.put(
        s.volumes_bucket,
        "v1",
        VolumeRecord(
            id="v1", name="data", size_gb=1, host="h1", created_at=now, attachments=attached
        ),
    )
    await bus.put(
        s.volumes_bucket,
        "v2",
        VolumeRecord(id="v2", name="dup", size_gb=1, host="h1", created_at=now),
    )
    await bus.put(
        s.volumes_bucket,
        "v3",
        VolumeRecord(id="v3", name="dup", size_gb=2, host="h1", created_at=now),
    )
    async with gw.async_client() as client:
        await _until(client, "/volumes/v3", 200)
        by_name = (await client.get("/volumes/data")).json()
        assert by_name["id"] == "v1" and by_name["attachments"][0]["instance_id"] == A
        assert "." not in by_name["created_at"]  # hypeman: second precision
        assert (await client.get("/volumes/dup")).status_code == 409
        assert (await client.get("/volumes/v")).status_code == 404  # no prefixes for volumes
        refused = await client.delete("/volumes/v1")
        assert refused.status_code == 409
        assert refused.json() == {"code": "conflict", "message": "volume is in use by an instance"}
        assert [v["id"] for v in (await client.get("/volumes")).json()] == ["v1", "v2", "v3"]


async def test_wait_is_woken_by_record_changes(gw: GatewayHandle, bus: Bus) -> None:
    s = bus.subjects
    await bus.put(
        s.instances_bucket, A, instance_record(A, "web", "h1", state=InstanceState.STOPPED)
    )
    async with gw.async_client() as client:
        await _until(client, f"/instances/{A}", 200)
        timed_out = await client.get(
            f"/instances/{A}/wait", params={"state": "Running", "timeout": "100ms"}
        )
        assert timed_out.json() == {"state": "Stopped", "state_error": None, "timed_out": True}

        async def later() -> None:
            await anyio.sleep(0.3)
            await bus.put(s.instances_bucket, A, instance_record(A, "web", "h1"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(later)
            reached = await client.get(
                f"/instances/{A}/wait", params={"state": "Running", "timeout": "30s"}
            )
        assert reached.json() == {"state": "Running", "state_error": None, "timed_out": False}
        for bad in ({"state": "Flying"}, {}, {"state": "Running", "timeout": "soon"}):
            assert (await client.get(f"/instances/{A}/wait", params=bad)).status_code == 400


async def test_instances_of_a_silent_host_read_unknown_until_it_returns(nats_url: str) -> None:
    from natsbus import Layout

    prefix = "t" + secrets.token_hex(4)
    with running_gateway(nats_url, prefix, layout=Layout(host_ttl_s=1.5)) as gw:
        nc = await nats.connect(nats_url)
        try:
            bus = Bus(nc, prefix)
            s = bus.subjects
            await bus.put(s.hosts_bucket, "h7", host_record("h7"))
            await bus.put(s.instances_bucket, A, instance_record(A, "web", "h7"))
            async with gw.async_client() as client:
                await _until(client, f"/instances/{A}", 200)
                assert (await client.get(f"/instances/{A}")).json()["state"] == "Running"
                with anyio.fail_after(10):  # the heartbeat ages out; nothing is deleted
                    while (body := (await client.get(f"/instances/{A}")).json())[
                        "state"
                    ] != "Unknown":
                        await anyio.sleep(0.1)
                assert "host h7 is unreachable" in body["state_error"]
                listed = (await client.get("/instances", params={"state": "Unknown"})).json()
                assert [i["id"] for i in listed] == [A]
                await bus.put(s.hosts_bucket, "h7", host_record("h7"))  # the host is back
                with anyio.fail_after(10):
                    while (body := (await client.get(f"/instances/{A}")).json())[
                        "state"
                    ] != "Running":
                        await anyio.sleep(0.1)
                assert body["state_error"] is None
        finally:
            await nc.close()


async def test_requested_host_must_agree_with_the_volumes_host(gw: GatewayHandle, bus: Bus) -> None:
    s = bus.subjects
    await bus.put(s.hosts_bucket, "h1", host_record("h1"))
    await bus.put(s.hosts_bucket, "h2", host_record("h2"))
    await bus.put(s.volumes_bucket, "vol-x", _volume_on("h1"))
    body = {
        "name": "pinned",
        "image": "busybox",
        "host": "h2",
        "volumes": [{"volume_id": "vol-x", "mount_path": "/data"}],
    }
    async with gw.async_client() as client:
        with anyio.fail_after(10):
            while (await client.get("/volumes/vol-x")).status_code != 200:
                await anyio.sleep(0.05)
        response = await client.post("/instances", json=body)
    assert response.status_code == 409
    assert response.json()["code"] == "volume_on_other_host"


def _volume_on(host: str) -> object:
    from datetime import UTC, datetime

    from schemas.messages import VolumeRecord

    return VolumeRecord(id="vol-x", name="x", size_gb=1, host=host, created_at=datetime.now(UTC))


async def test_drain_and_undrain_a_host(gw: GatewayHandle, bus: Bus) -> None:
    s = bus.subjects
    await bus.put(s.hosts_bucket, "h1", host_record("h1"))
    async with gw.async_client() as client:
        with anyio.fail_after(10):
            while not (await client.get("/hosts")).json():
                await anyio.sleep(0.05)
        drained = await client.post("/hosts/h1/drain", json={"reason": "kernel update"})
        assert drained.status_code == 200, drained.text
        assert drained.json() == {
            "host": "h1",
            "drained": True,
            "standby": [],
            "moved": {},
            "errors": {},
        }
        assert [h["drained"] for h in (await client.get("/hosts")).json()] == [True]
        refused = await client.post("/volumes", json={"name": "v", "size_gb": 1})
        assert (refused.status_code, refused.json()["code"]) == (503, "no_capacity")
        undrained = await client.delete("/hosts/h1/drain")
        assert undrained.json()["drained"] is False
        assert [h["drained"] for h in (await client.get("/hosts")).json()] == [False]
        assert (await client.post("/hosts/nope/drain")).status_code == 404
        assert (await client.delete("/hosts/h1/drain")).status_code == 404
