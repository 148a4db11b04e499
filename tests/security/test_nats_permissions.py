"""The generated NATS permissions, enforced by a real nats-server (docs/security.md).

One fleet per module: nats-server with ``vmfleet nats-config``'s accounts for hosts h1
and h2, a real ``vmfleet gateway`` (gateway user) and a real ``vmfleet worker`` for h1
(h1's user). The components work with exactly their permissions (the server logs no
violation of theirs); a connection with h1's credentials cannot consume, answer or write
anything of h2's, and what it tried left no trace.

No instance is created, so no guest boots: the worker pulls an image and makes volumes
(archives travel through the object store), which exercises every bucket it writes.
"""

from __future__ import annotations

import io
import json
import secrets
import tarfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import anyio
import httpx
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from nats.js.errors import KeyNotFoundError

from schemas.subjects import Subjects
from tests.support.fleet import WorkerProcess
from tests.support.secure_nats import GatewayProcess, Probe, SecureNats

pytestmark = pytest.mark.anyio

H1, H2 = "h1", "h2"


@dataclass(frozen=True)
class Fleet:
    nats: SecureNats
    gateway: GatewayProcess
    worker: WorkerProcess

    @property
    def subjects(self) -> Subjects:
        return self.nats.subjects

    def component_violations(self) -> list[str]:
        """Violations nats-server logged for the gateway's or the worker's own connections
        (named vmfleet-gateway / vmfleet-worker-h1; the probes here are named "probe")."""
        log = self.nats.server.log_path.read_text(errors="replace")
        return [
            line
            for line in log.splitlines()
            if "Violation" in line
            and ('vmfleet-gateway"' in line or f'vmfleet-worker-{H1}"' in line)
        ]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, test_assets: Path) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("secure")
    prefix = "s" + secrets.token_hex(4)
    with SecureNats(root / "nats", prefix, (H1, H2)) as server:
        # The gateway provisions the layout; the worker's user may only look it up.
        gateway = GatewayProcess(server.env(), root / "gateway.log")
        gateway.start()
        worker = WorkerProcess(
            server.url,
            prefix,
            test_assets,
            **server.env(H1),
            VMFLEET_HOST_ID=H1,
            VMFLEET_METRICS_ADDR="off",
        )
        try:
            gateway.wait_ready()
            worker.start()
            yield Fleet(server, gateway, worker)
        finally:
            worker.cleanup()
            gateway.stop()


@pytest.fixture
async def as_gateway(fleet: Fleet) -> AsyncIterator[Probe]:
    probe = await fleet.nats.connect()
    yield probe
    await probe.close()


@pytest.fixture
async def as_h1(fleet: Fleet) -> AsyncIterator[Probe]:
    probe = await fleet.nats.connect(H1)
    yield probe
    await probe.close()


async def _wait_for_heartbeat(fleet: Fleet, gateway: Probe, timeout_s: float = 180) -> bytes:
    hosts = await gateway.nc.jetstream().key_value(fleet.subjects.hosts_bucket)
    with anyio.fail_after(timeout_s):
        while True:
            try:
                entry = await hosts.get(H1)
            except KeyNotFoundError:
                assert fleet.worker.proc is not None and fleet.worker.proc.poll() is None, (
                    fleet.worker.log.read_text(errors="replace")[-3000:]
                )
                await anyio.sleep(0.2)
                continue
            return entry.value or b""


async def test_the_worker_starts_and_heartbeats_with_its_own_credentials(
    fleet: Fleet, as_gateway: Probe
) -> None:
    record = json.loads(await _wait_for_heartbeat(fleet, as_gateway))
    assert record["id"] == H1
    # A heartbeat later, still fine: the worker keeps beating with the same permissions.
    await anyio.sleep(6)
    assert json.loads(await _wait_for_heartbeat(fleet, as_gateway, 10))["id"] == H1
    assert fleet.component_violations() == []


async def test_the_gateway_serves_the_fleet_with_its_own_credentials(
    fleet: Fleet, as_gateway: Probe
) -> None:
    await _wait_for_heartbeat(fleet, as_gateway)
    with fleet.gateway.client() as client:
        hosts = client.get("/hosts")
        assert hosts.status_code == 200, hosts.text
        assert [h["id"] for h in hosts.json()] == [H1]
        assert client.get("/instances").json() == []
    assert fleet.component_violations() == []


async def test_an_image_pull_and_volumes_work_through_both_components(
    fleet: Fleet, as_gateway: Probe, busybox_image: str
) -> None:
    """Every bucket the worker writes (images, volumes) and the archives object store, end
    to end through the real gateway and worker, each with its own user."""
    await _wait_for_heartbeat(fleet, as_gateway)
    async with httpx.AsyncClient(
        base_url=fleet.gateway.base_url,
        headers=fleet.gateway.headers(),
        timeout=120,
    ) as client:
        pulled = await client.post("/images", json={"name": busybox_image})
        assert pulled.status_code in (200, 202), pulled.text
        name = pulled.json()["name"]
        with anyio.fail_after(180):
            while True:
                image = (await client.get("/images/" + quote(name, safe=":@"))).json()
                assert image.get("status") != "failed", image
                if image.get("status") == "ready":
                    break
                await anyio.sleep(0.2)

        empty = await client.post("/volumes", json={"name": "scratch", "size_gb": 1})
        assert empty.status_code == 201, empty.text
        form = {"name": "seeded", "size_gb": "1"}
        seeded = await client.post("/volumes", data=form, files={"content": _archive()})
        assert seeded.status_code == 201, seeded.text
        for volume in (empty.json(), seeded.json()):
            assert (await client.delete(f"/volumes/{volume['id']}")).status_code == 204
    assert fleet.component_violations() == []


async def test_a_worker_cannot_consume_another_hosts_commands(
    fleet: Fleet, as_gateway: Probe, as_h1: Probe
) -> None:
    s = fleet.subjects
    stream = s.commands_stream
    h2 = await fleet.nats.connect(H2)
    admin = await fleet.nats.connect(admin=True)
    try:
        # h2's durable consumer, made as h2's worker makes it; then a command for h2.
        h2_sub = await h2.nc.jetstream().pull_subscribe(
            s.command_filter(H2),
            durable=s.command_consumer(H2),
            stream=stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
        )
        gw = as_gateway.nc.jetstream()
        await gw.publish(s.command(H2, "create"), b"{}", headers={"Nats-Msg-Id": "for-h2-1"})

        js = as_h1.nc.jetstream(timeout=1)
        durable_h2 = s.command_consumer(H2)
        # 1. pull from h2's durable consumer
        stolen = await js.pull_subscribe_bind(durable_h2, stream=stream)
        with pytest.raises(NatsTimeoutError):
            await stolen.fetch(1, timeout=1)
        assert as_h1.refused(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable_h2}")
        # 2. look at it, or make its own consumer read h2's subjects (new or changed)
        with pytest.raises(NatsTimeoutError):
            await js.consumer_info(stream, durable_h2)
        for name in (s.command_consumer(H1), "sneaky"):
            with pytest.raises(NatsTimeoutError):
                await js.add_consumer(
                    stream,
                    ConsumerConfig(
                        name=name, durable_name=name, filter_subject=s.command_filter(H2)
                    ),
                )
            assert as_h1.refused(f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{s.command_filter(H2)}")
        with pytest.raises(NatsTimeoutError):
            await js.add_consumer(stream, ConsumerConfig(filter_subject=s.command_filter(H2)))
        # 3. listen to the command subjects themselves, or to h2's (or any) reply inbox
        listeners = []
        for subject in (s.command_filter(H2), "_INBOX.>", f"_INBOX.{s.prefix}.worker.{H2}.>"):
            listeners.append(await as_h1.nc.subscribe(subject))
        await as_h1.nc.flush()
        await anyio.sleep(0.2)
        for listener in listeners:
            assert as_h1.refused(listener.subject, subscribe=True), as_h1.errors
        # 4. queue a command for h2 itself
        with pytest.raises(NatsTimeoutError):
            await js.publish(s.command(H2, "delete"), b"{}", headers={"Nats-Msg-Id": "by-h1"})
        assert as_h1.refused(s.command(H2, "delete"))

        await gw.publish(s.command(H2, "stop"), b"{}", headers={"Nats-Msg-Id": "for-h2-2"})
        # Nothing reached h1, and h2's queue holds exactly the gateway's two commands,
        # never delivered to anyone.
        for listener in listeners:
            with pytest.raises(NatsTimeoutError):
                await listener.next_msg(timeout=0.3)
        info = await admin.nc.jetstream().consumer_info(stream, durable_h2)
        assert (info.num_pending, info.delivered.consumer_seq) == (2, 0)
        delivered = await h2_sub.fetch(2, timeout=5)
        assert [m.subject for m in delivered] == [s.command(H2, "create"), s.command(H2, "stop")]
        for msg in delivered:
            await msg.ack()
        assert h2.violations() == []
    finally:
        await h2.close()
        await admin.close()


async def test_a_worker_cannot_write_another_hosts_records(
    fleet: Fleet, as_gateway: Probe, as_h1: Probe
) -> None:
    s = fleet.subjects
    js = as_h1.nc.jetstream(timeout=1)
    # h2's heartbeat (a forged host record would attract placements)
    hosts = await js.key_value(s.hosts_bucket)
    with pytest.raises(NatsTimeoutError):
        await hosts.put(H2, b'{"id": "h2"}')
    assert as_h1.refused(f"$KV.{s.hosts_bucket}.{H2}")
    # h2's state transitions, and drains (a gateway's)
    with pytest.raises(NatsTimeoutError):
        await js.publish(s.state(H2, "i-forged"), b"{}")
    assert as_h1.refused(s.state(H2, "i-forged"))
    drains = await js.key_value(s.drains_bucket)
    with pytest.raises(NatsTimeoutError):
        await drains.put(H2, b"{}")
    assert as_h1.refused(f"$KV.{s.drains_bucket}.{H2}")
    # the layout itself: no new streams, no deleting or changing the fleet's
    with pytest.raises(NatsTimeoutError):
        await js.add_stream(StreamConfig(name=f"{s.prefix}_mine", subjects=[f"{s.prefix}.x.>"]))
    with pytest.raises(NatsTimeoutError):
        await js.delete_stream(s.commands_stream)
    with pytest.raises(NatsTimeoutError):
        await js.update_stream(StreamConfig(name=s.states_stream, subjects=[s.states_all]))

    # No trace of any of it, as the gateway reads the fleet.
    gw = as_gateway.nc.jetstream()
    with pytest.raises(KeyNotFoundError):
        await (await gw.key_value(s.hosts_bucket)).get(H2)
    with pytest.raises(KeyNotFoundError):
        await (await gw.key_value(s.drains_bucket)).get(H2)
    states = await gw.stream_info(s.states_stream, subjects_filter=s.state_filter(H2))
    assert not states.state.subjects
    assert (await gw.stream_info(s.commands_stream)).config.subjects == [s.commands_all]
    with fleet.gateway.client() as client:
        assert [h["id"] for h in client.get("/hosts").json()] == [H1]

    # An operator sees who tried what: the user and the subject, in nats-server's log.
    user, wanted = fleet.nats.user(H1), f"$KV.{s.hosts_bucket}.{H2}"
    log = fleet.nats.server.log_path.read_text(errors="replace").splitlines()
    assert any(f"user:{user}" in line and wanted in line for line in log)
    assert fleet.component_violations() == []


async def test_workers_move_bundles_between_hosts_with_their_own_credentials(
    fleet: Fleet, as_gateway: Probe, as_h1: Probe, tmp_path: Path
) -> None:
    """worker.transfer as h1 uploads and as h2 fetches and deletes (a snapshot forked on
    another host, an instance moved), with nothing refused."""
    from worker.transfer import HostCache, delete_bundle, open_store, upload_bundle

    await _wait_for_heartbeat(fleet, as_gateway)  # the gateway has provisioned the store
    source = tmp_path / "bundle"
    source.mkdir()
    (source / "memory").write_bytes(secrets.token_bytes(300_000))
    await upload_bundle(await open_store(as_h1.nc.jetstream(), fleet.subjects), "snap-p", source)
    as_h2 = await fleet.nats.connect(H2)
    try:
        store = await open_store(as_h2.nc.jetstream(), fleet.subjects)
        fetched = await HostCache(store, tmp_path / "cache", 1 << 30).fetch("snap-p")
        assert (fetched / "memory").read_bytes() == (source / "memory").read_bytes()
        await delete_bundle(store, "snap-p")
        assert as_h2.violations() == []
    finally:
        await as_h2.close()
    assert as_h1.violations() == []


async def test_a_worker_cannot_ask_or_answer_for_another_host(
    fleet: Fleet, as_gateway: Probe, as_h1: Probe
) -> None:
    s = fleet.subjects
    await _wait_for_heartbeat(fleet, as_gateway)
    answering = await as_h1.nc.subscribe(s.host_query(H2, "result"))
    await as_h1.nc.flush()
    with pytest.raises((NatsTimeoutError, NoRespondersError)):
        await as_h1.nc.request(s.host_query(H2, "result"), b"cmd-1", timeout=1)
    assert as_h1.refused(s.host_query(H2, "result"), subscribe=True)
    assert as_h1.refused(s.host_query(H2, "result"))
    # Nobody serves h2's queries (h1's subscription was refused), while h1's own are
    # answered by the real worker (an unknown command id: an empty answer).
    with pytest.raises(NoRespondersError):
        await as_gateway.nc.request(s.host_query(H2, "result"), b"cmd-1", timeout=2)
    reply = await as_gateway.nc.request(s.host_query(H1, "result"), b"cmd-unknown", timeout=5)
    assert reply.data == b""
    with pytest.raises(NatsTimeoutError):
        await answering.next_msg(timeout=0.2)


async def test_a_worker_can_read_no_session_of_another_host(
    fleet: Fleet, as_gateway: Probe, as_h1: Probe
) -> None:
    """Guest sessions (exec and cp bytes) of h2 are out of h1's reach: not their frames
    from the gateway, not the guest's answers, not the opens or stats sent to h2."""
    s = fleet.subjects
    await _wait_for_heartbeat(fleet, as_gateway)
    session = "s" + secrets.token_hex(8)
    stolen = [
        s.session_in(H2, session),
        s.session_filter(H2, "in"),
        s.session_filter(H2, "out"),
        s.session_filter(None, "in"),
        s.session_open(H2),
        s.stat_query(H2),
    ]
    subscriptions = [await as_h1.nc.subscribe(subject) for subject in stolen]
    await as_h1.nc.publish(s.session_out(H2, session), b"forged output")
    await as_h1.nc.flush()
    # What the gateway sends h2 reaches none of h1's subscriptions.
    watcher = await as_gateway.nc.subscribe(s.session_out(H2, session))
    await as_gateway.nc.publish(s.session_in(H2, session), b"stdin of h2")
    await as_gateway.nc.flush()
    for subject in stolen:
        assert as_h1.refused(subject, subscribe=True), subject
    assert as_h1.refused(s.session_out(H2, session))
    for subscription in subscriptions:
        with pytest.raises(NatsTimeoutError):
            await subscription.next_msg(timeout=0.2)
    with pytest.raises(NatsTimeoutError):  # the forged output never reached the gateway
        await watcher.next_msg(timeout=0.2)
    # h1's own sessions are h1's: it may read their input and write their output.
    mine = await as_h1.nc.subscribe(s.session_in(H1, session))
    await as_h1.nc.publish(s.session_out(H1, session), b"")
    await as_h1.nc.flush()
    assert not as_h1.refused(s.session_in(H1, session), subscribe=True)
    assert not as_h1.refused(s.session_out(H1, session))
    await mine.unsubscribe()


def _archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("seed.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"seed"))
    return buffer.getvalue()
