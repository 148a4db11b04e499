"""Two hosts behind two gateways on a 3-node NATS cluster, all real, all on loopback: where
creates land, what a host's capacity allows when both gateways place at once, and what
happens to a host's instances when its worker dies or the host is drained.

Four guests boot in the whole module (256 MB, 1 vCPU each): one per host (``pair``), one
that mounts a volume (``volume_bound``), one in the concurrency test. Every worker accepts
2.5 vCPUs (``VMFLEET_CPU_OVERCOMMIT`` scaled to this machine's CPUs), so two such guests
fit on a host and three do not; the gateways are told the same ratio.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import nats
import pytest
from nats.js.errors import KeyNotFoundError

from cli.embedded_nats import free_port
from gateway.ids import new_id
from natsbus import Layout
from schemas.api import Hypervisor
from schemas.codec import decode_volume_record
from schemas.messages import Create, PullImage
from schemas.references import normalize_reference
from schemas.subjects import Subjects
from tests.support.cluster import NatsCluster
from tests.support.fleet import VMFLEET, FleetClient, WorkerProcess, now
from tests.support.gateway import GatewayHandle, running_gateway

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

#: vCPUs each host accepts (hosts and gateways both get the matching overcommit ratio).
CPU_LIMIT = 2.5
MIB = 1 << 20
GIB = 1 << 30


@dataclass
class TwoHosts:
    cluster: NatsCluster
    prefix: str
    workers: list[WorkerProcess]
    gateways: tuple[GatewayHandle, GatewayHandle]
    image: str

    @property
    def host_ids(self) -> list[str]:
        return [w.host_id for w in self.workers]

    def worker(self, host_id: str) -> WorkerProcess:
        return next(w for w in self.workers if w.host_id == host_id)

    def other(self, host_id: str) -> str:
        return next(h for h in self.host_ids if h != host_id)

    async def fleet_client(self) -> FleetClient:
        return FleetClient(await nats.connect(self.cluster.urls), self.prefix)


@pytest.fixture(scope="module")
def two_hosts(
    tmp_path_factory: pytest.TempPathFactory, test_assets: Path, busybox_image: str
) -> Iterator[TwoHosts]:
    cluster = NatsCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    urls = ",".join(cluster.urls)
    prefix = "f" + secrets.token_hex(4)
    ratio = CPU_LIMIT / (os.cpu_count() or 1)
    workers = [
        WorkerProcess(
            urls, prefix, test_assets, VMFLEET_REPLICAS="3", VMFLEET_CPU_OVERCOMMIT=repr(ratio)
        )
        for _ in range(2)
    ]
    config: dict[str, object] = {"layout": Layout(replicas=3), "cpu_overcommit": ratio}
    try:
        for worker in workers:
            worker.start()
        with (
            running_gateway(urls, prefix, **config) as g1,
            running_gateway(urls, prefix, **config) as g2,
        ):
            fleet = TwoHosts(cluster, prefix, workers, (g1, g2), busybox_image)
            anyio.run(_pull_everywhere, fleet)
            yield fleet
            _delete_everything(g1)
    finally:
        for worker in workers:
            worker.cleanup()
        cluster.stop()


async def _pull_everywhere(fleet: TwoHosts) -> None:
    """Both hosts get the image ready, so that image locality does not decide between
    them, and both gateways see both hosts with it."""
    client = await fleet.fleet_client()
    try:
        for host_id in fleet.host_ids:
            await client.wait_for_host(host_id)
            pull = PullImage(id=f"pull-{host_id}", issued_at=now(), image=fleet.image)
            result = await client.send(host_id, pull, timeout_s=300)
            assert result.ok, result.error
    finally:
        await client.close()
    name = normalize_reference(fleet.image).name
    for gw in fleet.gateways:
        async with gw.async_client() as api:
            await until_hosts(
                api,
                lambda found: all(
                    name in found.get(h, {}).get("images", ()) for h in fleet.host_ids
                ),
            )


def _delete_everything(api: GatewayHandle) -> None:
    with api.client() as client:
        for instance in client.get("/instances").json():
            client.delete(f"/instances/{instance['id']}")
        for volume in client.get("/volumes").json():
            client.delete(f"/volumes/{volume['id']}")


# -- helpers -----------------------------------------------------------------------------------


Json = dict[str, Any]


async def until(
    probe: Callable[[], Awaitable[Json]], done: Callable[[Json], bool], timeout_s: float = 120
) -> Json:
    """``probe()`` again and again until ``done`` says yes to its value; that value."""
    with anyio.fail_after(timeout_s):
        while not done(value := await probe()):
            await anyio.sleep(0.3)
    return value


async def hosts(api: httpx.AsyncClient) -> Json:
    """The live hosts, by id."""
    return {h["id"]: h for h in (await api.get("/hosts")).json()}


async def instance(api: httpx.AsyncClient, instance_id: str) -> Json:
    response = await api.get(f"/instances/{instance_id}")
    assert response.status_code == 200, response.text
    body: Json = response.json()
    return body


async def until_hosts(api: httpx.AsyncClient, done: Callable[[Json], bool]) -> Json:
    return await until(lambda: hosts(api), done)


async def until_state(api: httpx.AsyncClient, instance_id: str, state: str) -> Json:
    return await until(lambda: instance(api, instance_id), lambda body: body["state"] == state)


async def allocated_everywhere(fleet: TwoHosts, vcpus: dict[str, int]) -> None:
    """Wait until both gateways' views show these hosts holding these many vCPUs."""
    for gw in fleet.gateways:
        async with gw.async_client() as api:
            await until_hosts(
                api,
                lambda found: all(
                    found.get(h, {}).get("vcpus_allocated") == n for h, n in vcpus.items()
                ),
            )


def guest(name: str, **extra: object) -> dict[str, object]:
    """A small guest: 256 MB, 1 vCPU, a 1 GB overlay."""
    return {"name": name, "size": "256MB", "vcpus": 1, "overlay_size": "1GB", **extra}


def create(api: httpx.Client, fleet: TwoHosts, name: str, **extra: object) -> dict[str, Any]:
    response = api.post("/instances", json={"image": fleet.image, **guest(name, **extra)})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def cli(gw: GatewayHandle, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HYPEMAN_BASE_URL": gw.base_url, "HYPEMAN_API_KEY": gw.token}
    return subprocess.run(
        [VMFLEET, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


# -- the instances the tests share -------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    instances: list[dict[str, Any]]
    port: int

    def on(self, host_id: str) -> dict[str, Any]:
        return next(i for i in self.instances if i["host"] == host_id)


@pytest.fixture(scope="module")
def pair(two_hosts: TwoHosts) -> Pair:
    """Two instances created one after the other through the same gateway; the first maps
    a host port."""
    port = free_port()
    with two_hosts.gateways[0].client() as api:
        first = create(
            api, two_hosts, "first", port_mappings=[{"host_port": port, "guest_port": 80}]
        )
        second = create(api, two_hosts, "second")
    return Pair([first, second], port)


@dataclass(frozen=True)
class VolumeBound:
    volume_id: str
    volume_host: str
    instance: dict[str, Any]


@pytest.fixture(scope="module")
def volume_bound(two_hosts: TwoHosts, pair: Pair) -> Iterator[VolumeBound]:
    """A volume (on the host the gateway chose for it), and an instance that mounts it."""
    with two_hosts.gateways[1].client() as api:
        made = api.post("/volumes", json={"name": "data", "size_gb": 1})
        assert made.status_code == 201, made.text
        volume_id = made.json()["id"]
        host = anyio.run(_volume_host, two_hosts, volume_id)
    with two_hosts.gateways[0].client() as api:
        bound = create(
            api, two_hosts, "bound", volumes=[{"volume_id": volume_id, "mount_path": "/data"}]
        )
    yield VolumeBound(volume_id, host, bound)
    with two_hosts.gateways[0].client() as api:
        assert api.delete(f"/instances/{bound['id']}").status_code == 204
        assert api.delete(f"/volumes/{volume_id}").status_code == 204


async def _volume_host(fleet: TwoHosts, volume_id: str) -> str:
    """The host in the volume's record (the API does not show it)."""
    nc = await nats.connect(fleet.cluster.urls)
    try:
        kv = await nc.jetstream().key_value(Subjects(fleet.prefix).volumes_bucket)
        with anyio.fail_after(30):
            while True:
                try:
                    record = decode_volume_record((await kv.get(volume_id)).value or b"")
                except KeyNotFoundError:
                    record = None
                if record is not None and record.host is not None:
                    return record.host
                await anyio.sleep(0.2)
    finally:
        await nc.close()


# -- the tests ---------------------------------------------------------------------------------


async def test_creates_spread_over_the_hosts(two_hosts: TwoHosts, pair: Pair) -> None:
    assert sorted(i["host"] for i in pair.instances) == sorted(two_hosts.host_ids)
    mapped = pair.instances[0]
    for gw in two_hosts.gateways:
        async with gw.async_client() as api:
            for created in pair.instances:
                assert (await instance(api, created["id"]))["state"] == "Running"
    await allocated_everywhere(two_hosts, dict.fromkeys(two_hosts.host_ids, 1))
    async with two_hosts.gateways[1].async_client() as api:
        found = await until_hosts(
            api, lambda found: f"{pair.port}/tcp" in found[mapped["host"]]["ports"]
        )
    for host_id in two_hosts.host_ids:  # each heartbeat counts its host's instance
        assert found[host_id]["memory_allocated_bytes"] == 256 * MIB
        assert found[host_id]["disk_promised_bytes"] > 0  # most of a sparse 1 GB overlay
    assert f"{pair.port}/tcp" not in found[two_hosts.other(mapped["host"])]["ports"]


async def test_exec_reaches_an_instance_on_either_host_from_either_gateway(
    two_hosts: TwoHosts, pair: Pair
) -> None:
    """Session bytes travel gateway ↔ owning worker over NATS: any gateway, any host."""
    from hypeman import AsyncHypeman
    from hypeman.lib import exec_async

    for gw in two_hosts.gateways:
        # Closed here, in this test's event loop: a client left to the garbage collector
        # would close its connections in a later test's loop, or in none.
        async with AsyncHypeman(api_key=gw.token, base_url=gw.base_url, max_retries=0) as client:
            for created in pair.instances:
                result = await exec_async(
                    client, created["id"], ["/bin/sh", "-c", "cat /etc/hostname; exit 4"]
                )
                assert result.exit_code == 4
                info = await client.instances.stat(created["id"], path="/etc/hostname")
                assert info.exists and info.is_file and info.size == len(result.output)


async def test_a_volume_bound_create_lands_on_the_volumes_host(
    two_hosts: TwoHosts, pair: Pair, volume_bound: VolumeBound
) -> None:
    assert volume_bound.instance["host"] == volume_bound.volume_host
    elsewhere = pair.on(two_hosts.other(volume_bound.volume_host))
    mount = {"volume_id": volume_bound.volume_id, "mount_path": "/data"}
    async with two_hosts.gateways[1].async_client() as api:
        attached = await api.post(
            f"/instances/{elsewhere['id']}/volumes/{volume_bound.volume_id}",
            json={"mount_path": "/data"},
        )
        assert attached.status_code == 409, attached.text
        assert attached.json()["code"] == "volume_on_other_host"
        pinned = await api.post(
            "/instances",
            json={
                "image": two_hosts.image,
                **guest("pinned", host=elsewhere["host"], volumes=[mount]),
            },
        )
        assert pinned.status_code == 409, pinned.text
        assert pinned.json()["code"] == "volume_on_other_host"
        mounted = await instance(api, volume_bound.instance["id"])
    assert mounted["state"] == "Running"
    assert [v["volume_id"] for v in mounted["volumes"]] == [volume_bound.volume_id]


async def test_a_worker_refuses_disk_it_does_not_have(two_hosts: TwoHosts) -> None:
    """Sent straight to the worker (a gateway would not place it): nothing is made."""
    host_id = two_hosts.host_ids[0]
    async with two_hosts.gateways[0].async_client() as api:
        free = (await hosts(api))[host_id]["disk_free_bytes"]
    client = await two_hosts.fleet_client()
    try:
        cmd = Create(
            id=new_id(),
            instance_id=new_id(),
            issued_at=now(),
            name="huge",
            image=two_hosts.image,
            size_bytes=256 * MIB,
            overlay_bytes=free + 10 * GIB,
            vcpus=1,
            hypervisor=Hypervisor.QEMU,
        )
        result = await client.send(host_id, cmd)
        assert not result.ok and result.error is not None
        assert (result.error.status, result.error.code) == (503, "host_full")
        assert "MiB of disk" in result.error.message
        assert await client.record(cmd.instance_id) is None
    finally:
        await client.close()


async def test_concurrent_creates_from_both_gateways_never_overcommit_a_host(
    two_hosts: TwoHosts, pair: Pair, volume_bound: VolumeBound
) -> None:
    full = volume_bound.volume_host  # its pair instance and the volume-bound one: 2 vCPUs
    roomy = two_hosts.other(full)  # 1 vCPU: room for exactly one more
    await allocated_everywhere(two_hosts, {full: 2, roomy: 1})
    g1, g2 = two_hosts.gateways
    answers: list[httpx.Response] = []
    async with g1.async_client() as api1, g2.async_client() as api2:

        async def post(api: httpx.AsyncClient, name: str) -> None:
            body = {"image": two_hosts.image, **guest(name)}
            answers.append(await api.post("/instances", json=body))

        async with anyio.create_task_group() as tg:
            for n, api in enumerate((api1, api2, api1, api2)):
                tg.start_soon(post, api, f"rush-{n}")
        created = [a.json() for a in answers if a.status_code == 201]
        refused = [a for a in answers if a.status_code != 201]
        assert len(created) == 1, [a.text for a in answers]
        assert created[0]["host"] == roomy
        for answer in refused:
            assert answer.status_code == 503, answer.text
            assert answer.json()["code"] in ("no_capacity", "host_full")
        every = (await api2.get("/instances")).json()
        for host_id in two_hosts.host_ids:
            assert sum(i["vcpus"] for i in every if i["host"] == host_id) <= CPU_LIMIT
        await allocated_everywhere(two_hosts, {full: 2, roomy: 2})
        assert (await api1.delete(f"/instances/{created[0]['id']}")).status_code == 204
    await allocated_everywhere(two_hosts, {full: 2, roomy: 1})


async def test_a_drained_host_gets_no_new_instances(
    two_hosts: TwoHosts, pair: Pair, volume_bound: VolumeBound
) -> None:
    drained = two_hosts.other(volume_bound.volume_host)
    full = volume_bound.volume_host
    victim = pair.on(drained)
    g1, g2 = two_hosts.gateways
    done = await anyio.to_thread.run_sync(
        cli, g1, "host", "drain", drained, "--standby", "--reason", "test"
    )
    assert done.returncode == 0, done.stderr
    assert f"standby: {victim['id']}" in done.stdout
    async with g2.async_client() as api:
        assert (await instance(api, victim["id"]))["state"] == "Standby"
        assert (await hosts(api))[drained]["drained"] is True
    await allocated_everywhere(two_hosts, {drained: 0, full: 2})
    # Only the drained host has room now. A size the worker refuses (below 64 MB) shows
    # where a create would go without booting anything: refused at the gateway while the
    # host is drained, sent to it (and refused there) once it is back.
    tiny = {"image": two_hosts.image, **guest("tiny", size="32MB")}
    async with g2.async_client() as api:
        refused = await api.post("/instances", json=tiny)
        assert (refused.status_code, refused.json()["code"]) == (503, "no_capacity"), refused.text
        pinned = await api.post("/instances", json={**tiny, "host": drained})
        assert (pinned.status_code, pinned.json()["code"]) == (503, "no_capacity")
        assert "drained" in pinned.json()["message"]
    back = await anyio.to_thread.run_sync(cli, g1, "host", "undrain", drained)
    assert back.returncode == 0, back.stderr
    async with g2.async_client() as api:
        await until_hosts(api, lambda found: found[drained]["drained"] is False)
        sent = await api.post("/instances", json=tiny)
        assert (sent.status_code, sent.json()["code"]) == (400, "invalid_size"), sent.text
        restored = await api.post(f"/instances/{victim['id']}/restore")
        assert restored.status_code == 200, restored.text
        assert restored.json()["state"] == "Running"


async def test_a_killed_workers_instances_read_unknown_until_it_is_back(
    two_hosts: TwoHosts, pair: Pair
) -> None:
    victim = pair.instances[0]
    dead, alive = victim["host"], two_hosts.other(victim["host"])
    survivor = pair.on(alive)
    await anyio.to_thread.run_sync(two_hosts.worker(dead).kill)
    for gw in two_hosts.gateways:
        async with gw.async_client() as api:
            seen = await until_state(api, victim["id"], "Unknown")
            assert f"host {dead} is unreachable" in seen["state_error"]
            stopped = await api.post(f"/instances/{victim['id']}/stop")
            assert (stopped.status_code, stopped.json()["code"]) == (503, "host_unavailable")
            assert (await instance(api, survivor["id"]))["state"] == "Running"
            assert list(await hosts(api)) == [alive]
    async with two_hosts.gateways[1].async_client() as api:  # the other host keeps serving
        standby = await api.post(f"/instances/{survivor['id']}/standby")
        assert (standby.status_code, standby.json()["state"]) == (200, "Standby"), standby.text
        restored = await api.post(f"/instances/{survivor['id']}/restore")
        assert (restored.status_code, restored.json()["state"]) == (200, "Running")

    two_hosts.worker(dead).start()
    for gw in two_hosts.gateways:
        async with gw.async_client() as api:
            back = await until_state(api, victim["id"], "Running")
            assert back["state_error"] is None
            assert sorted(await hosts(api)) == sorted(two_hosts.host_ids)


async def test_a_standby_instance_moves_to_the_other_host_with_its_memory(
    two_hosts: TwoHosts, pair: Pair, volume_bound: VolumeBound
) -> None:
    """`vmfleet host drain ID --move`: same id and name, the guest's memory (a tmpfs file)
    and disk (a file on its overlay) on the other host; nothing left on the old one. An
    instance with a volume (files of its host) is refused and stays as it was."""
    from hypeman import AsyncHypeman
    from hypeman.lib import exec_async

    source = volume_bound.volume_host
    moving, bound = pair.on(source), volume_bound.instance
    target = two_hosts.other(source)
    token = secrets.token_hex(8)
    g1, g2 = two_hosts.gateways
    script = (
        "mkdir -p /run/mem && mount -t tmpfs none /run/mem && "
        f"echo {token} > /run/mem/mark && echo disk-{token} > /root/mark && sync"
    )
    async with AsyncHypeman(api_key=g1.token, base_url=g1.base_url, max_retries=0) as client:
        wrote = await exec_async(client, moving["id"], ["/bin/sh", "-c", script])
        assert wrote.exit_code == 0, wrote.output
    async with g1.async_client() as api:
        for standing in (moving, bound):
            standby = await api.post(f"/instances/{standing['id']}/standby")
            assert standby.status_code == 200, standby.text

    done = await anyio.to_thread.run_sync(cli, g1, "host", "drain", source, "--move")
    try:
        assert done.returncode == 1, done.stdout + done.stderr  # one of two was refused
        assert f"moved: {moving['id']} -> host {target}" in done.stdout
        assert (
            f"not moved: {bound['id']}: instance {bound['id']} has volumes attached "
            f"({volume_bound.volume_id}): volumes are files on host {source} and do not "
            "move; detach them first"
        ) in done.stdout
        async with g2.async_client() as api:
            moved = await until(
                lambda: instance(api, moving["id"]), lambda body: body["host"] == target
            )
            assert (moved["name"], moved["state"]) == (moving["name"], "Standby")
            restored = await api.post(f"/instances/{moving['id']}/restore")
            assert (restored.status_code, restored.json()["state"]) == (200, "Running")
            stayed = await instance(api, bound["id"])
            assert (stayed["host"], stayed["state"]) == (source, "Standby")
            again = await api.post(f"/instances/{bound['id']}/restore")
            assert (again.status_code, again.json()["state"]) == (200, "Running"), again.text
        assert not (two_hosts.worker(source).data_dir / "guests" / moving["id"]).exists()
        async with httpx.AsyncClient() as http:
            sent = (await http.get(two_hosts.worker(source).metrics_url)).text
            fetched = (await http.get(two_hosts.worker(target).metrics_url)).text
        assert 'vmfleet_worker_transfer_seconds_count{direction="sent"} 1.0' in sent
        assert 'vmfleet_worker_transfer_seconds_count{direction="fetched"} 1.0' in fetched
        async with AsyncHypeman(api_key=g2.token, base_url=g2.base_url, max_retries=0) as client:
            read = await exec_async(
                client, moving["id"], ["/bin/sh", "-c", "cat /run/mem/mark /root/mark"]
            )
            assert read.exit_code == 0, read.output
            assert read.output.decode().split() == [token, f"disk-{token}"]
    finally:
        back = await anyio.to_thread.run_sync(cli, g1, "host", "undrain", source)
        assert back.returncode == 0, back.stderr


async def test_a_fork_placed_on_the_other_host_fetches_the_snapshot(
    two_hosts: TwoHosts, pair: Pair, volume_bound: VolumeBound
) -> None:
    """The snapshot's host is drained, so placement puts the fork on the other host: the
    snapshot travels through the transfers store, and the fork has the parent's memory."""
    from hypeman import AsyncHypeman
    from hypeman.lib import exec_async

    g1, g2 = two_hosts.gateways
    # The instance the move test took to the other host (or, run alone, did not).
    parent = pair.on(volume_bound.volume_host)
    async with g1.async_client() as api:
        parent = await instance(api, parent["id"])
    holder, elsewhere = parent["host"], two_hosts.other(parent["host"])
    token = secrets.token_hex(8)
    async with AsyncHypeman(api_key=g1.token, base_url=g1.base_url, max_retries=0) as client:
        wrote = await exec_async(
            client,
            parent["id"],
            [
                "/bin/sh",
                "-c",
                f"mkdir -p /run/fork && mount -t tmpfs none /run/fork && "
                f"echo {token} > /run/fork/mark",
            ],
        )
        assert wrote.exit_code == 0, wrote.output
        snap = await client.instances.snapshots.create(parent["id"], kind="Standby", name="warm")
        drained = await anyio.to_thread.run_sync(cli, g1, "host", "drain", holder)
        assert drained.returncode == 0, drained.stderr
        try:
            fork = await client.snapshots.fork(snap.id, name="far-fork")
            assert fork.state == "Running"
            async with g2.async_client() as api:
                assert (await instance(api, fork.id))["host"] == elsewhere
                snapshot = (await api.get(f"/snapshots/{snap.id}")).json()
            read = await exec_async(client, fork.id, ["/bin/sh", "-c", "cat /run/fork/mark"])
            assert read.output.decode().split() == [token], read.output
            assert (two_hosts.worker(elsewhere).data_dir / "transfers" / f"snap-{snap.id}").is_dir()
            assert snapshot["hosts"] == [holder, elsewhere], snapshot
            await client.instances.delete(fork.id)
            await client.snapshots.delete(snap.id)
        finally:
            back = await anyio.to_thread.run_sync(cli, g1, "host", "undrain", holder)
            assert back.returncode == 0, back.stderr
