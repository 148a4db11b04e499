"""The worker daemon over real NATS: commands in, records, state events and log lines out."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import nats
import pytest
from nats.js.api import DeliverPolicy
from nats.js.errors import KeyNotFoundError

from cli.embedded_nats import NatsServerProcess
from schemas.api import Hypervisor, InstanceState
from schemas.codec import decode_log_line, decode_state_event, encode
from schemas.messages import (
    Create,
    Delete,
    InstanceRecord,
    Restore,
    Standby,
    Start,
    StateEvent,
    Stop,
    VolumeRecord,
)
from tests.support.fleet import FleetClient, WorkerProcess, now
from tests.support.gateway import instance_record

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

MIB = 1 << 20
TICKER = 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.05; done'


def create(instance_id: str, image: str, script: str) -> Create:
    return Create(
        id=f"create-{instance_id}",
        instance_id=instance_id,
        issued_at=now(),
        name=instance_id,
        image=image,
        size_bytes=256 * MIB,
        overlay_bytes=256 * MIB,
        vcpus=1,
        hypervisor=Hypervisor.QEMU,
        cmd=["/bin/sh", "-c", script],
    )


@pytest.fixture
def worker(nats_url: str, subject_prefix: str, test_assets: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(nats_url, subject_prefix, test_assets, VMFLEET_LOG_MAX_SIZE="8KB")
    process.start()
    try:
        yield process
    finally:
        process.cleanup()


@pytest.fixture
async def fleet(
    nats_url: str, subject_prefix: str, worker: WorkerProcess
) -> AsyncIterator[FleetClient]:
    client = await FleetClient.connect(nats_url, subject_prefix)
    await client.wait_for_host(worker.host_id)
    try:
        yield client
    finally:
        with anyio.move_on_after(60, shield=True):
            if worker.proc is not None and worker.proc.poll() is None:
                await client.delete_all(worker.host_id)
        await client.close()


async def state_events(fleet: FleetClient, instance_id: str) -> list[StateEvent]:
    js = fleet.nc.jetstream()
    sub = await js.subscribe(
        fleet.subjects.state_filter(instance=instance_id),
        deliver_policy=DeliverPolicy.ALL,
        ordered_consumer=True,
    )
    events = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                return events
            events.append(decode_state_event(msg.data))
    finally:
        await sub.unsubscribe()


async def test_lifecycle_over_nats(
    fleet: FleetClient, worker: WorkerProcess, busybox_image: str
) -> None:
    result = await fleet.send(
        worker.host_id, create("web", busybox_image, "echo hello-vmfleet; sleep 3600")
    )
    assert result.ok, result.error
    assert result.instance is not None and result.instance.state is InstanceState.RUNNING
    record = await fleet.record("web")
    assert (
        record is not None
        and record.state is InstanceState.RUNNING
        and record.host == worker.host_id
    )

    for cmd, state in [
        (Standby(id="c2", instance_id="web", issued_at=now()), InstanceState.STANDBY),
        (Restore(id="c3", instance_id="web", issued_at=now()), InstanceState.RUNNING),
        (Stop(id="c4", instance_id="web", issued_at=now()), InstanceState.STOPPED),
        (Start(id="c5", instance_id="web", issued_at=now()), InstanceState.RUNNING),
    ]:
        result = await fleet.send(worker.host_id, cmd)
        assert result.ok, result.error
        assert (await fleet.record("web")).state is state  # type: ignore[union-attr]

    refused = await fleet.send(worker.host_id, Restore(id="c6", instance_id="web", issued_at=now()))
    assert not refused.ok and refused.error is not None
    assert (refused.error.status, refused.error.code) == (409, "invalid_state")

    transitions = [(e.previous, e.state) for e in await state_events(fleet, "web")]
    S = InstanceState
    assert transitions == [
        (S.CREATED, S.INITIALIZING),
        (S.INITIALIZING, S.RUNNING),
        (S.RUNNING, S.PAUSED),
        (S.PAUSED, S.STANDBY),
        (S.STANDBY, S.PAUSED),
        (S.PAUSED, S.RUNNING),
        (S.RUNNING, S.SHUTDOWN),
        (S.SHUTDOWN, S.STOPPED),
        (S.STOPPED, S.CREATED),
        (S.CREATED, S.INITIALIZING),
        (S.INITIALIZING, S.RUNNING),
    ]

    # The app's output is in the logs stream.
    js = fleet.nc.jetstream()
    sub = await js.subscribe(
        fleet.subjects.logs("web", "app"), deliver_policy=DeliverPolicy.ALL, ordered_consumer=True
    )
    lines = []
    with anyio.fail_after(30):
        while "hello-vmfleet" not in lines:
            lines.append(decode_log_line((await sub.next_msg(timeout=30)).data).line)
    await sub.unsubscribe()

    deleted = await fleet.send(worker.host_id, Delete(id="c7", instance_id="web", issued_at=now()))
    assert deleted.ok
    assert await fleet.record("web") is None
    assert (await state_events(fleet, "web"))[-1].deleted
    assert worker.qemu_processes() == []

    # The worker's own scrape target counts what it did.
    async with httpx.AsyncClient() as client:
        scraped = (await client.get(worker.metrics_url)).text
    for op in ("create", "standby", "restore", "stop", "start", "delete"):
        assert f'vmfleet_worker_commands_total{{op="{op}",outcome="ok"}} 1.0' in scraped, op
    assert 'vmfleet_worker_commands_total{op="restore",outcome="invalid_state"} 1.0' in scraped
    assert 'vmfleet_worker_op_seconds_count{op="create"} 1.0' in scraped
    assert 'vmfleet_worker_log_lines_total{source="app"}' in scraped


async def test_same_command_id_runs_once(
    fleet: FleetClient, worker: WorkerProcess, busybox_image: str
) -> None:
    first = await fleet.send(worker.host_id, create("once", busybox_image, "sleep 3600"))
    again = await fleet.send(worker.host_id, create("once", busybox_image, "sleep 3600"))
    assert first.ok and again.ok
    assert again.instance is not None and first.instance is not None
    assert again.instance.id == first.instance.id
    assert len(worker.qemu_processes()) == 1
    boots = [e for e in await state_events(fleet, "once") if e.state is InstanceState.INITIALIZING]
    assert len(boots) == 1


async def test_malformed_command_is_answered_and_not_retried(
    fleet: FleetClient, worker: WorkerProcess
) -> None:
    js = fleet.nc.jetstream()
    sub = await fleet.nc.subscribe(fleet.subjects.result("bad-1"), max_msgs=1)
    await js.publish(
        fleet.subjects.command(worker.host_id, "create"),
        b'{"op": "create", "id": 5}',
        headers={"Nats-Msg-Id": "bad-1"},
    )
    reply = json.loads((await sub.next_msg(timeout=30)).data)
    assert reply["ok"] is False and reply["error"]["status"] == 400
    info = await js.consumer_info(
        fleet.subjects.commands_stream, fleet.subjects.command_consumer(worker.host_id)
    )
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def kill_worker_during(
    fleet: FleetClient,
    worker: WorkerProcess,
    cmd: Create | Standby,
    seen: InstanceState,
    expected: InstanceState,
) -> InstanceRecord:
    """Send ``cmd`` without waiting, SIGKILL the worker once the instance reached ``seen``,
    start a new worker, and wait until the redelivered command has left it ``expected``."""
    await fleet.nc.jetstream().publish(
        fleet.subjects.command(worker.host_id, cmd.op), encode(cmd), headers={"Nats-Msg-Id": cmd.id}
    )
    with anyio.fail_after(60):
        while not any(e.state is seen for e in await state_events(fleet, cmd.instance_id)):
            await anyio.sleep(0.01)
    worker.kill()
    worker.start()
    with anyio.fail_after(120):
        while True:
            record = await fleet.record(cmd.instance_id)
            if record and record.state is expected and record.last_command_id == cmd.id:
                return record
            await anyio.sleep(0.2)


async def test_sigkill_during_standby_converges(
    fleet: FleetClient, worker: WorkerProcess, busybox_image: str
) -> None:
    await fleet.send(worker.host_id, create("sb", busybox_image, TICKER))
    standby = Standby(id="sb-1", instance_id="sb", issued_at=now())
    record = await kill_worker_during(
        fleet, worker, standby, InstanceState.PAUSED, InstanceState.STANDBY
    )
    # Redelivered to the new worker, the standby completed, exactly once in effect.
    assert record.has_snapshot
    assert worker.qemu_processes() == []
    restored = await fleet.send(
        worker.host_id, Restore(id="sb-2", instance_id="sb", issued_at=now())
    )
    assert restored.ok, restored.error
    assert len(worker.qemu_processes()) == 1


async def test_sigkill_during_create_converges(
    fleet: FleetClient, worker: WorkerProcess, busybox_image: str
) -> None:
    cmd = create("cr", busybox_image, "echo created; sleep 3600")
    await kill_worker_during(fleet, worker, cmd, InstanceState.INITIALIZING, InstanceState.RUNNING)
    assert len(worker.qemu_processes()) == 1


async def test_log_lines_in_order_across_rotation(
    fleet: FleetClient, worker: WorkerProcess, busybox_image: str
) -> None:
    burst = 'i=0; while [ $i -lt 3000 ]; do i=$((i+1)); echo "tick $i"; done; sleep 3600'
    result = await fleet.send(worker.host_id, create("logs", busybox_image, burst))
    assert result.ok
    js = fleet.nc.jetstream()
    sub = await js.subscribe(
        fleet.subjects.logs("logs", "app"), deliver_policy=DeliverPolicy.ALL, ordered_consumer=True
    )
    ticks: list[int] = []
    seqs: list[int] = []
    with anyio.fail_after(120):
        while len(ticks) < 3000:  # about 30 KB of output: past the 8 KB rotation limit
            line = decode_log_line((await sub.next_msg(timeout=30)).data)
            seqs.append(line.seq)
            if match := re.fullmatch(r"tick (\d+)", line.line):
                ticks.append(int(match.group(1)))
    await sub.unsubscribe()
    rotated = worker.data_dir / "guests" / "logs" / "logs" / "app.log.1"
    with anyio.fail_after(10):
        while not rotated.exists():
            await anyio.sleep(0.05)
    assert ticks == list(range(1, len(ticks) + 1))
    assert seqs == list(range(1, len(seqs) + 1))


async def test_worker_rides_out_a_nats_restart(
    nats_server: NatsServerProcess, subject_prefix: str, test_assets: Path, busybox_image: str
) -> None:
    worker = WorkerProcess(nats_server.url, subject_prefix, test_assets)
    worker.start()
    fleet = await FleetClient.connect(nats_server.url, subject_prefix)
    try:
        await fleet.wait_for_host(worker.host_id)
        assert (await fleet.send(worker.host_id, create("nr", busybox_image, "sleep 3600"))).ok
        nats_server.stop()
        await anyio.sleep(1)
        nats_server.start()
        await anyio.to_thread.run_sync(nats_server.wait_ready)
        # Both the worker and this client reconnect; JetStream kept the streams and buckets.
        result = await fleet.send(
            worker.host_id, Stop(id="nr-stop", instance_id="nr", issued_at=now())
        )
        assert result.ok, result.error
        assert (await fleet.record("nr")).state is InstanceState.STOPPED  # type: ignore[union-attr]
        assert (
            await fleet.send(worker.host_id, Delete(id="nr-del", instance_id="nr", issued_at=now()))
        ).ok
    finally:
        await fleet.close()
        worker.cleanup()


async def test_volume_from_uploaded_archive(
    fleet: FleetClient, worker: WorkerProcess, tmp_path: Path
) -> None:
    import io
    import tarfile

    from nats.js.errors import ObjectNotFoundError

    from schemas.codec import decode_volume_record
    from schemas.messages import CreateVolume, DeleteVolume

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    js = fleet.nc.jetstream()
    archives = await js.object_store(fleet.subjects.archives_bucket)
    await archives.put("upload-1", buffer.getvalue())

    result = await fleet.send(
        worker.host_id,
        CreateVolume(
            id="cv-1",
            issued_at=now(),
            volume_id="vol-arc",
            name="arc",
            size_gb=1,
            archive="upload-1",
        ),
    )
    assert result.ok, result.error
    assert result.volume is not None and result.volume.host == worker.host_id
    kv = await js.key_value(fleet.subjects.volumes_bucket)
    assert decode_volume_record((await kv.get("vol-arc")).value or b"").name == "arc"
    with pytest.raises(ObjectNotFoundError):
        await archives.get("upload-1")

    assert (
        await fleet.send(
            worker.host_id, DeleteVolume(id="dv-1", issued_at=now(), volume_id="vol-arc")
        )
    ).ok


async def test_sigterm_leaves_vms_for_the_next_worker(
    fleet: FleetClient, worker: WorkerProcess, busybox_image: str
) -> None:
    assert (await fleet.send(worker.host_id, create("keep", busybox_image, "sleep 3600"))).ok
    (pid,) = worker.qemu_processes()
    assert worker.terminate() == 0
    assert worker.qemu_processes() == [pid]  # a production worker leaves its VMs running
    worker.start()
    stopped = await fleet.send(
        worker.host_id, Stop(id="keep-stop", instance_id="keep", issued_at=now())
    )
    assert stopped.ok, stopped.error  # the new worker adopted the VM and stops it gracefully
    assert worker.qemu_processes() == []


async def test_records_of_what_vanished_from_the_host_are_removed_at_start(
    fleet: FleetClient, worker: WorkerProcess
) -> None:
    """A worker killed between removing an instance's files and publishing the removal
    leaves a record of nothing; the next worker of that host removes it (and only it)."""
    assert worker.terminate() == 0
    js = fleet.nc.jetstream()
    instances = await js.key_value(fleet.subjects.instances_bucket)
    volumes = await js.key_value(fleet.subjects.volumes_bucket)
    await instances.put("ghost", encode(instance_record("ghost", "ghost", worker.host_id)))
    await instances.put("elsewhere", encode(instance_record("elsewhere", "other", "h-other")))
    ghost_volume = VolumeRecord(
        id="vghost", name="vg", size_gb=1, host=worker.host_id, created_at=now()
    )
    await volumes.put("vghost", encode(ghost_volume))

    worker.start()
    with anyio.fail_after(120):
        while await fleet.record("ghost") is not None:
            await anyio.sleep(0.2)
    assert await fleet.record("elsewhere") is not None
    with pytest.raises(KeyNotFoundError):
        await volumes.get("vghost")
    assert (await state_events(fleet, "ghost"))[-1].deleted
    await instances.delete("elsewhere")
