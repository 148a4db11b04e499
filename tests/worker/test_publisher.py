"""A record NATS will never take fails its own command, and the host goes on.

A real nats-server whose worker user may not write one volume's record (a permissions
deny on that one KV key), the real command consumer, dispatcher, volume store and
publisher: the denied volume's create answers a clear error naming the violation; the
commands after it, on other volumes, are answered and their records are in NATS.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import nats
import pytest
from nats.aio.client import Client
from prometheus_client import CollectorRegistry

from cli.embedded_nats import NatsServerProcess
from natsbus import BusOptions, Layout, PublishDenials, connect, kv_subject, provision
from schemas.codec import decode_command_result, encode
from schemas.messages import CommandResult, CreateVolume
from schemas.subjects import Subjects
from tests.support.fleet import now
from worker.commands import CommandConsumer
from worker.dispatch import Dispatcher
from worker.engine import HostEngine
from worker.ledger import Ledger
from worker.metrics import WorkerMetrics
from worker.publisher import RecordPublisher
from worker.volumes import VolumeStore

pytestmark = pytest.mark.anyio

HOST = "h1"
PREFIX = "tpub"
DENIED = "vol-denied"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServerProcess]:
    subjects = Subjects(PREFIX)
    denied = kv_subject(subjects.volumes_bucket, DENIED)
    config = tmp_path / "nats.conf"
    config.write_text(
        "accounts { A { jetstream: enabled, users: [\n"
        "  { user: admin, password: admin }\n"
        "  { user: worker, password: worker, permissions: {\n"
        f'      publish: {{ allow: [">"], deny: [{json.dumps(denied)}] }}\n'
        '      subscribe: { allow: [">"] } } }\n'
        "] } }\n"
    )
    process = NatsServerProcess(tmp_path / "nats", extra_args=("--config", str(config)))
    process.start()
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
async def admin(server: NatsServerProcess) -> AsyncIterator[Client]:
    client = await nats.connect(server.url, user="admin", password="admin")
    await provision(client.jetstream(), Subjects(PREFIX), Layout())
    try:
        yield client
    finally:
        await client.close()


async def create_volume(admin: Client, volume_id: str) -> CommandResult:
    subjects = Subjects(PREFIX)
    cmd = CreateVolume(
        id=f"c-{volume_id}", issued_at=now(), volume_id=volume_id, name=volume_id, size_gb=1
    )
    answers = await admin.subscribe(subjects.result(cmd.id), max_msgs=1)
    await admin.jetstream().publish(
        subjects.command(HOST, cmd.op), encode(cmd), headers={"Nats-Msg-Id": cmd.id}
    )
    with anyio.fail_after(60):
        return decode_command_result((await answers.next_msg(timeout=60)).data)


async def test_a_denied_record_fails_its_command_and_the_host_goes_on(
    admin: Client, server: NatsServerProcess, tmp_path: Path
) -> None:
    subjects = Subjects(PREFIX)
    denials = PublishDenials()
    nc = await connect(
        BusOptions(urls=(server.url,), user="worker", password="worker", denials=denials)
    )
    publisher = RecordPublisher(nc.jetstream(), subjects, HOST, denials=denials)
    volumes = VolumeStore(tmp_path / "data", HOST, on_change=publisher.volume_changed)
    # Volume commands never reach the engine.
    dispatcher = Dispatcher(cast(HostEngine, None), volumes, publisher)
    consumer = CommandConsumer(
        nc,
        subjects,
        HOST,
        dispatcher,
        Ledger(tmp_path / "ledger"),
        WorkerMetrics(CollectorRegistry()),
    )
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(publisher.run)
            await tg.start(consumer.run)
            denied = await create_volume(admin, DENIED)
            after = [await create_volume(admin, f"vol-ok-{n}") for n in range(2)]
            publisher.stop()  # shielded from cancellation: it stops when told
            tg.cancel_scope.cancel()
    finally:
        await nc.close()

    assert not denied.ok and denied.error is not None
    assert denied.error.status == 500
    assert "permissions violation" in denied.error.message
    assert DENIED in denied.error.message
    assert [result.ok for result in after] == [True, True], after
    kv = await admin.jetstream().key_value(subjects.volumes_bucket)
    for n in range(2):
        entry = await kv.get(f"vol-ok-{n}")
        assert cast(dict[str, Any], json.loads(entry.value or b"{}"))["id"] == f"vol-ok-{n}"
