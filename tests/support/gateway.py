"""A real gateway (uvicorn on a loopback port) in a thread of its own, and helpers to talk
to it: tokens, an httpx client, a fake host that only heartbeats or pulls images.

The gateway runs on its own event loop (an anyio blocking portal), so tests can drive it
with blocking clients (hypeman's sync SDK, httpx.Client) as well as async ones.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.from_thread
import httpx
import jwt
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig

from gateway import GatewayConfig, create_app
from gateway.server import bind, serve
from natsbus import BusOptions
from schemas.api import Hypervisor, ImageStatus, InstanceState
from schemas.codec import decode_command, decode_image_record, encode
from schemas.errors import ErrorInfo
from schemas.messages import CommandResult, DeleteImage, HostRecord, InstanceRecord, PullImage
from schemas.subjects import Subjects, image_key

__all__ = [
    "SECRET",
    "Bus",
    "FakeHost",
    "GatewayHandle",
    "host_record",
    "instance_record",
    "mint",
    "running_gateway",
]

SECRET = "gateway-test-secret-0123456789abcdef"
GIB = 1 << 30


def mint(secret: str = SECRET, ttl_s: int = 3600) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "test", "iat": now, "exp": now + ttl_s}, secret, algorithm="HS256")


@dataclass(frozen=True)
class GatewayHandle:
    base_url: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=120, **kwargs)  # type: ignore[arg-type]

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=120)


@contextlib.contextmanager
def running_gateway(nats_url: str, prefix: str, **config: object) -> Iterator[GatewayHandle]:
    """Serve a gateway of the fleet ``prefix`` until the block ends."""
    app = create_app(
        GatewayConfig(
            bus=BusOptions(urls=tuple(nats_url.split(",")), name="gateway-test"),
            jwt_secret=SECRET,
            subject_prefix=prefix,
            **config,  # type: ignore[arg-type]
        )
    )
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    with anyio.from_thread.start_blocking_portal() as portal:
        future, _ = portal.start_task(serve, app, sock)
        try:
            yield GatewayHandle(f"http://127.0.0.1:{port}", mint())
        finally:
            future.cancel()
            with contextlib.suppress(BaseException):
                future.result(timeout=30)


def host_record(host_id: str, **fields: object) -> HostRecord:
    now = datetime.now(UTC)
    values: dict[str, object] = {
        "id": host_id,
        "hypervisors": [Hypervisor.QEMU],
        "vcpus_total": 2,
        "memory_total_bytes": 8 * GIB,
        "disk_total_bytes": 100 * GIB,
        "disk_free_bytes": 50 * GIB,
        "started_at": now,
        "heartbeat_at": now,
        **fields,
    }
    return HostRecord(**values)  # type: ignore[arg-type]


class FakeHost:
    """A host that heartbeats, and answers PullImage commands as the worker contract of
    ``docs/api.md`` says (statuses in the images bucket, then a result) and DeleteImage
    commands (noting the digest in ``deleted``). Every other command stays in its queue,
    unanswered, like a host that hangs."""

    def __init__(self, nc: Client, prefix: str, host_id: str, **record: object) -> None:
        self.nc = nc
        self.subjects = Subjects(prefix)
        self.host_id = host_id
        self.record = record
        self.pull_delay_s = 0.3
        #: An image name whose pull fails at once with 404 (a registry without it).
        self.missing = "registry.invalid/nothing:here"
        #: The digests DeleteImage commands asked this host to remove.
        self.deleted: list[str] = []

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        js = self.nc.jetstream()
        hosts = await js.key_value(self.subjects.hosts_bucket)
        await hosts.put(self.host_id, encode(host_record(self.host_id, **self.record)))
        subscriptions = [
            await js.pull_subscribe(
                self.subjects.command(self.host_id, op),
                durable=f"fake_{self.host_id}_{op}",
                stream=self.subjects.commands_stream,
                config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
            )
            for op in ("pullimage", "deleteimage")
        ]
        task_status.started()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat, hosts)
            for subscription in subscriptions:
                tg.start_soon(self._take, subscription, tg)

    async def _take(self, subscription: Any, tg: TaskGroup) -> None:
        while True:
            try:
                messages = await subscription.fetch(1, timeout=1)
            except NatsTimeoutError:
                continue
            for msg in messages:
                cmd = decode_command(msg.data)
                await msg.ack()
                if isinstance(cmd, PullImage):
                    tg.start_soon(self._pull, cmd)
                elif isinstance(cmd, DeleteImage):
                    self.deleted.append(cmd.digest)
                    await self._answer(CommandResult(command_id=cmd.id, ok=True))

    async def _heartbeat(self, hosts: object) -> None:
        while True:
            await anyio.sleep(2)
            await hosts.put(self.host_id, encode(host_record(self.host_id, **self.record)))  # type: ignore[attr-defined]

    async def _pull(self, cmd: PullImage) -> None:
        js = self.nc.jetstream()
        kv = await js.key_value(self.subjects.images_bucket)
        key = image_key(cmd.image)
        if cmd.image == self.missing:
            error = ErrorInfo(status=404, code="not_found", message="image not found")
            await self._answer(CommandResult(command_id=cmd.id, ok=False, error=error))
            return
        for status in (ImageStatus.PULLING, ImageStatus.CONVERTING, ImageStatus.READY):
            await anyio.sleep(self.pull_delay_s)
            entry = await kv.get(key)
            record = decode_image_record(entry.value or b"")
            record.status = status
            record.digest = "sha256:" + "ab" * 32
            if status is ImageStatus.READY:
                record.size_bytes = 10 << 20
                record.cmd = ["/bin/sh"]
                record.hosts = [self.host_id]
            await kv.update(key, encode(record), last=entry.revision)
        await self._answer(CommandResult(command_id=cmd.id, ok=True, image=record))

    async def _answer(self, result: CommandResult) -> None:
        await self.nc.publish(self.subjects.result(result.command_id), encode(result))


def instance_record(instance_id: str, name: str, host: str, **fields: object) -> InstanceRecord:
    """A record as a worker would write it (for tests that need no VM)."""
    values: dict[str, object] = {
        "id": instance_id,
        "name": name,
        "image": "docker.io/library/busybox:latest",
        "host": host,
        "state": InstanceState.RUNNING,
        "size_bytes": 1 * GIB,
        "overlay_bytes": 10 * GIB,
        "vcpus": 2,
        "network_enabled": False,
        "hypervisor": Hypervisor.QEMU,
        "created_at": datetime.now(UTC),
        **fields,
    }
    return InstanceRecord(**values)  # type: ignore[arg-type]


class Bus:
    """Direct access to one fleet's NATS objects, to set up what a test needs."""

    def __init__(self, nc: Client, prefix: str) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = Subjects(prefix)

    async def put(self, bucket: str, key: str, value: object) -> None:
        kv = await self.js.key_value(bucket)
        await kv.put(key, value if isinstance(value, bytes) else encode(value))

    async def delete(self, bucket: str, key: str) -> None:
        kv = await self.js.key_value(bucket)
        await kv.delete(key)
