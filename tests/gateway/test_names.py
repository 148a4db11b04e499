"""Instance names are claimed fleet-wide: of two creates with one name through two
gateways exactly one is made, the other is 400 ``name_conflict``; a delete frees the name,
and so does a create that fails; a claim whose instance never appeared (a gateway that died
mid-create) holds its name only for a grace period."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import anyio
import httpx
import nats
import pytest
from anyio.abc import TaskStatus
from nats.js.api import AckPolicy, ConsumerConfig

from gateway.names import CLAIM_GRACE_S
from schemas.codec import decode_command, encode
from schemas.errors import ErrorInfo
from schemas.messages import CommandResult, Create, Delete, NameClaim
from tests.support.gateway import Bus, GatewayHandle, host_record, instance_record, running_gateway

pytestmark = pytest.mark.anyio


class Host:
    """Heartbeats; makes and deletes instance records as a worker would (no VM). A create
    of a name in ``refuse`` is answered 400, as a worker refuses a bad request."""

    def __init__(self, bus: Bus, host_id: str) -> None:
        self.bus, self.host_id = bus, host_id
        self.refuse: set[str] = set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s = self.bus.subjects
        durable = f"names_{self.host_id}"
        subscription = await self.bus.js.pull_subscribe(
            s.command_filter(self.host_id),
            durable=durable,
            stream=s.commands_stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
        )
        record = host_record(self.host_id, heartbeat_at=datetime.now(UTC))
        await self.bus.put(s.hosts_bucket, self.host_id, record)
        task_status.started()
        try:
            while True:
                try:
                    messages = await subscription.fetch(1, timeout=1)
                except nats.errors.TimeoutError:
                    continue
                for msg in messages:
                    await msg.ack()
                    await self._answer(decode_command(msg.data))
        finally:
            with anyio.CancelScope(shield=True):
                await self.bus.delete(s.hosts_bucket, self.host_id)
                await subscription.unsubscribe()
                await self.bus.js.delete_consumer(s.commands_stream, durable)

    async def _answer(self, cmd: object) -> None:
        s = self.bus.subjects
        if isinstance(cmd, Create) and cmd.name in self.refuse:
            error = ErrorInfo(status=400, code="invalid_image", message="refused")
            result = CommandResult(command_id=cmd.id, ok=False, error=error)
        elif isinstance(cmd, Create):
            record = instance_record(
                cmd.instance_id, cmd.name, self.host_id, last_command_id=cmd.id
            )
            await self.bus.put(s.instances_bucket, cmd.instance_id, record)
            result = CommandResult(command_id=cmd.id, ok=True, instance=record)
        elif isinstance(cmd, Delete):
            await self.bus.delete(s.instances_bucket, cmd.instance_id)
            result = CommandResult(command_id=cmd.id, ok=True)
        else:
            return
        await self.bus.nc.publish(s.result(cmd.id), encode(result))


@pytest.fixture
def second_gw(nats_url: str, subject_prefix: str, gw: GatewayHandle) -> Iterator[GatewayHandle]:
    """Another gateway of the same fleet."""
    with running_gateway(nats_url, subject_prefix) as handle:
        yield handle


def body(name: str) -> dict[str, object]:
    return {"name": name, "image": "busybox", "size": "256MB", "vcpus": 1}


async def wait_for_hosts(client: httpx.AsyncClient, count: int) -> None:
    with anyio.fail_after(10):
        while len((await client.get("/hosts")).json()) != count:
            await anyio.sleep(0.05)


async def test_one_name_through_two_gateways_makes_one_instance(
    gw: GatewayHandle, second_gw: GatewayHandle, bus: Bus
) -> None:
    name = f"dup-{secrets.token_hex(4)}"
    host = Host(bus, "names-a")
    responses: list[httpx.Response] = []
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        async with gw.async_client() as one, second_gw.async_client() as two:
            await wait_for_hosts(one, 1)
            await wait_for_hosts(two, 1)

            async def create(client: httpx.AsyncClient) -> None:
                responses.append(await client.post("/instances", json=body(name)))

            async with anyio.create_task_group() as creates:
                creates.start_soon(create, one)
                creates.start_soon(create, two)
            statuses = sorted(r.status_code for r in responses)
            assert statuses == [201, 400], [r.text for r in responses]
            (refused,) = [r for r in responses if r.status_code == 400]
            assert refused.json()["code"] == "name_conflict"
            assert name in refused.json()["message"]
            made = next(r for r in responses if r.status_code == 201).json()
            # Either gateway refuses it again, and the name still finds the one instance.
            again = await two.post("/instances", json=body(name))
            assert (again.status_code, again.json()["code"]) == (400, "name_conflict")
            assert (await one.get(f"/instances/{name}")).json()["id"] == made["id"]
            # Deleted: the name is free again, through either gateway.
            assert (await two.delete(f"/instances/{name}")).status_code == 204
            remade = await one.post("/instances", json=body(name))
            assert remade.status_code == 201, remade.text
            assert (await one.delete(f"/instances/{remade.json()['id']}")).status_code == 204
        tg.cancel_scope.cancel()


async def test_a_failed_create_frees_its_name(gw: GatewayHandle, bus: Bus) -> None:
    name = f"fail-{secrets.token_hex(4)}"
    host = Host(bus, "names-b")
    host.refuse.add(name)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        async with gw.async_client() as client:
            await wait_for_hosts(client, 1)
            failed = await client.post("/instances", json=body(name))
            assert (failed.status_code, failed.json()["code"]) == (400, "invalid_image")
            host.refuse.clear()
            made = await client.post("/instances", json=body(name))
            assert made.status_code == 201, made.text
            assert (await client.delete(f"/instances/{name}")).status_code == 204
        tg.cancel_scope.cancel()


async def test_an_abandoned_claim_holds_its_name_only_for_a_while(
    gw: GatewayHandle, bus: Bus
) -> None:
    """What a gateway that died between its claim and its command leaves: a claim naming an
    instance that does not exist."""
    fresh, stale = f"fresh-{secrets.token_hex(4)}", f"stale-{secrets.token_hex(4)}"
    now = datetime.now(UTC)
    names = bus.subjects.names_bucket
    await bus.put(names, fresh, NameClaim(instance_id="ghost1", claimed_at=now))
    old = now - timedelta(seconds=CLAIM_GRACE_S + 1)
    await bus.put(names, stale, NameClaim(instance_id="ghost2", claimed_at=old))
    host = Host(bus, "names-c")
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        async with gw.async_client() as client:
            await wait_for_hosts(client, 1)
            held = await client.post("/instances", json=body(fresh))
            assert (held.status_code, held.json()["code"]) == (400, "name_conflict")
            taken = await client.post("/instances", json=body(stale))
            assert taken.status_code == 201, taken.text
            assert (await client.delete(f"/instances/{stale}")).status_code == 204
        tg.cancel_scope.cancel()
    await bus.delete(names, fresh)
