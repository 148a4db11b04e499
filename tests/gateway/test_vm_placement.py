"""A host that refuses a create as full (another gateway filled it since its heartbeat)
makes the gateway place the instance on another host."""

from __future__ import annotations

import anyio
import nats
import pytest
from anyio.abc import TaskStatus
from nats.js.api import AckPolicy, ConsumerConfig

from schemas.codec import decode_command, encode
from schemas.errors import ErrorInfo
from schemas.messages import CommandResult
from schemas.subjects import Subjects
from tests.gateway.conftest import Fleet
from tests.support.gateway import host_record

pytestmark = [pytest.mark.anyio, pytest.mark.vm]


async def full_host(
    nc: nats.NATS, subjects: Subjects, host_id: str, *, task_status: TaskStatus[None]
) -> None:
    """Heartbeats with the most free memory of the fleet, and refuses every create."""
    js = nc.jetstream()
    hosts = await js.key_value(subjects.hosts_bucket)
    subscription = await js.pull_subscribe(
        subjects.command(host_id, "create"),
        durable=f"full_{host_id}",
        stream=subjects.commands_stream,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
    )
    await hosts.put(host_id, encode(host_record(host_id, memory_total_bytes=1 << 40)))
    task_status.started()
    try:
        while True:
            try:
                messages = await subscription.fetch(1, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for msg in messages:
                cmd = decode_command(msg.data)
                await msg.ack()
                error = ErrorInfo(status=503, code="host_full", message=f"host {host_id} is full")
                result = CommandResult(command_id=cmd.id, ok=False, error=error)
                await nc.publish(subjects.result(cmd.id), encode(result))
    finally:
        with anyio.CancelScope(shield=True):
            await hosts.delete(host_id)


async def test_create_refused_as_full_lands_on_another_host(
    fleet: Fleet, busybox_image: str
) -> None:
    nc = await nats.connect(fleet.nats_url)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(full_host, nc, Subjects(fleet.prefix), "roomy-but-full")
            async with fleet.api.async_client() as client:
                with anyio.fail_after(30):
                    while len((await client.get("/hosts")).json()) < 2:
                        await anyio.sleep(0.1)
                body = {
                    "name": "placed",
                    "image": busybox_image,
                    "size": "256MB",
                    "vcpus": 1,
                    "cmd": ["/bin/sh", "-c", "sleep 3600"],
                }
                created = await client.post("/instances", json=body)
                assert created.status_code == 201, created.text
                assert created.json()["host"] == fleet.worker.host_id
                assert (
                    await client.delete(f"/instances/{created.json()['id']}")
                ).status_code == 204
            tg.cancel_scope.cancel()
    finally:
        await nc.close()
