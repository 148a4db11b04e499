"""Placement through the API, against hosts that only heartbeat and answer creates (no VM):
host ports, image locality, refusals retried elsewhere, volumes of another host."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime

import anyio
import httpx
import msgspec
import nats
import pytest
from anyio.abc import TaskStatus
from nats.js.api import AckPolicy, ConsumerConfig

from schemas.codec import decode_command, encode
from schemas.errors import ErrorInfo
from schemas.messages import CommandResult, Create, VolumeRecord
from tests.support.gateway import Bus, GatewayHandle, host_record, instance_record

pytestmark = pytest.mark.anyio

GIB = 1 << 30
Answer = Callable[[Create], ErrorInfo | None]


def accept(cmd: Create) -> ErrorInfo | None:
    return None


def refuse(code: str, status: int = 409) -> Answer:
    return lambda cmd: ErrorInfo(status=status, code=code, message=f"refused: {code}")


class Host:
    """Heartbeats ``record`` fields; answers each create with ``answer`` (None: success,
    with the instance record written as a worker would)."""

    def __init__(self, bus: Bus, host_id: str, answer: Answer, **record: object) -> None:
        self.bus, self.host_id, self.answer, self.record = bus, host_id, answer, record
        self.creates: list[Create] = []

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s = self.bus.subjects
        subscription = await self.bus.js.pull_subscribe(
            s.command(self.host_id, "create"),
            durable=f"fake_{self.host_id}",
            stream=s.commands_stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
        )
        await self._beat()
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeats)
                while True:
                    try:
                        messages = await subscription.fetch(1, timeout=1)
                    except nats.errors.TimeoutError:
                        continue
                    for msg in messages:
                        cmd = decode_command(msg.data)
                        await msg.ack()
                        assert isinstance(cmd, Create)
                        self.creates.append(cmd)
                        await self._answer(cmd)
        finally:
            with anyio.CancelScope(shield=True):  # gone at once, not after the TTL
                await self.bus.delete(s.hosts_bucket, self.host_id)
                await subscription.unsubscribe()
                await self.bus.js.delete_consumer(s.commands_stream, f"fake_{self.host_id}")

    async def _beat(self) -> None:
        record = host_record(self.host_id, heartbeat_at=datetime.now(UTC), **self.record)
        await self.bus.put(self.bus.subjects.hosts_bucket, self.host_id, record)

    async def _heartbeats(self) -> None:
        while True:
            await anyio.sleep(2)
            await self._beat()

    async def _answer(self, cmd: Create) -> None:
        s = self.bus.subjects
        error = self.answer(cmd)
        if error is not None:
            result = CommandResult(command_id=cmd.id, ok=False, error=error)
        else:
            record = instance_record(
                cmd.instance_id, cmd.name, self.host_id, last_command_id=cmd.id
            )
            await self.bus.put(s.instances_bucket, cmd.instance_id, record)
            result = CommandResult(command_id=cmd.id, ok=True, instance=record)
        await self.bus.nc.publish(s.result(cmd.id), encode(result))


async def create_on(
    gw: GatewayHandle, bus: Bus, hosts: list[Host], **body: object
) -> tuple[httpx.Response, dict[str, int]]:
    """Start the hosts, POST one create, return the answer and how many creates each got."""
    # A name of its own each time: names are claimed fleet-wide, and this fleet is shared.
    name = f"placed-{secrets.token_hex(4)}"
    request = {"name": name, "image": "busybox", "size": "256MB", "vcpus": 1, **body}
    async with anyio.create_task_group() as tg:
        for host in hosts:
            await tg.start(host.run)
        async with gw.async_client() as client:
            wanted = sorted(h.host_id for h in hosts)
            with anyio.fail_after(10):
                while sorted(h["id"] for h in (await client.get("/hosts")).json()) != wanted:
                    await anyio.sleep(0.05)
            response = await client.post("/instances", json=request)
        tg.cancel_scope.cancel()
    return response, {h.host_id: len(h.creates) for h in hosts}


WEB = {"port_mappings": [{"host_port": 18080, "guest_port": 80}]}


async def test_a_port_taken_on_the_chosen_host_is_tried_elsewhere(
    gw: GatewayHandle, bus: Bus
) -> None:
    busy = Host(bus, "busy", refuse("port_in_use"), memory_total_bytes=64 * GIB)
    free = Host(bus, "free", accept)
    response, sent = await create_on(gw, bus, [busy, free], **WEB)
    assert response.status_code == 201, response.text
    assert response.json()["host"] == "free"
    assert sent == {"busy": 1, "free": 1}


async def test_a_pinned_create_gets_its_hosts_refusal(gw: GatewayHandle, bus: Bus) -> None:
    busy = Host(bus, "busy", refuse("port_in_use"), memory_total_bytes=64 * GIB)
    free = Host(bus, "free", accept)
    response, sent = await create_on(gw, bus, [busy, free], host="busy", **WEB)
    assert (response.status_code, response.json()["code"]) == (409, "port_in_use")
    assert sent == {"busy": 1, "free": 0}


async def test_a_full_pinned_host_is_not_replaced_by_another(gw: GatewayHandle, bus: Bus) -> None:
    full = Host(bus, "full", refuse("host_full", 503), memory_total_bytes=64 * GIB)
    free = Host(bus, "free", accept)
    response, sent = await create_on(gw, bus, [full, free], host="full")
    assert (response.status_code, response.json()["code"]) == (503, "host_full")
    assert sent == {"full": 1, "free": 0}


async def test_hosts_whose_heartbeat_holds_the_port_get_nothing(
    gw: GatewayHandle, bus: Bus
) -> None:
    roomy = Host(bus, "roomy", accept, memory_total_bytes=64 * GIB, ports=["18080/tcp"])
    other = Host(bus, "other", accept, ports=["18080/udp"])
    response, sent = await create_on(gw, bus, [roomy, other], **WEB)
    assert response.status_code == 201, response.text
    assert response.json()["host"] == "other"
    assert sent == {"roomy": 0, "other": 1}
    taken = Host(bus, "taken", accept, ports=["18080/tcp"])
    refused, sent = await create_on(gw, bus, [taken], **WEB)
    assert (refused.status_code, refused.json()["code"]) == (409, "port_in_use")
    assert "18080/tcp" in refused.json()["message"]


async def test_a_host_with_the_image_ready_is_chosen(gw: GatewayHandle, bus: Bus) -> None:
    roomy = Host(bus, "roomy", accept, memory_total_bytes=64 * GIB)
    warm = Host(bus, "warm", accept, images=["docker.io/library/busybox:latest"])
    response, sent = await create_on(gw, bus, [roomy, warm], image="busybox")
    assert response.status_code == 201, response.text
    assert response.json()["host"] == "warm"
    assert sent == {"roomy": 0, "warm": 1}
    response, _ = await create_on(gw, bus, [roomy, warm], image="alpine")
    assert response.json()["host"] == "roomy"  # nobody has it: the most free memory


async def test_a_host_without_the_disk_gets_nothing(gw: GatewayHandle, bus: Bus) -> None:
    roomy = Host(bus, "roomy", accept, memory_total_bytes=64 * GIB, disk_promised_bytes=45 * GIB)
    other = Host(bus, "other", accept)
    response, _ = await create_on(gw, bus, [roomy, other], overlay_size="10GB")
    assert response.json()["host"] == "other"  # roomy: 50 GiB free, 45 promised
    refused, _ = await create_on(gw, bus, [roomy], overlay_size="10GB")
    assert (refused.status_code, refused.json()["code"]) == (503, "no_capacity")


async def test_attaching_a_volume_of_another_host_is_409(gw: GatewayHandle, bus: Bus) -> None:
    s = bus.subjects
    now = datetime.now(UTC)
    await bus.put(s.instances_bucket, "inst-a", instance_record("inst-a", "a", "h1"))
    volume = VolumeRecord(id="vol-b", name="b", size_gb=1, host="h2", created_at=now)
    await bus.put(s.volumes_bucket, "vol-b", msgspec.json.encode(volume))
    async with gw.async_client() as client:
        with anyio.fail_after(10):
            while (await client.get("/volumes/vol-b")).status_code != 200 or (
                await client.get("/instances/inst-a")
            ).status_code != 200:
                await anyio.sleep(0.05)
        response = await client.post("/instances/inst-a/volumes/vol-b", json={"mount_path": "/d"})
    assert response.status_code == 409
    assert response.json()["code"] == "volume_on_other_host"
    assert "host h2" in response.json()["message"]
