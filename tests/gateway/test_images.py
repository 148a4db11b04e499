"""Images: the asynchronous pull as hypeman clients see it. The gateway's side of the flow
(pending record, one pull for concurrent requests, refusals) is driven here by a host that
follows the worker contract of docs/api.md with controlled timing (``FakeHost``); the real
worker's pull is exercised end to end in test_vm_sdk.py."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import anyio
import httpx
import pytest

from schemas.subjects import image_key
from tests.gateway.conftest import Fleet
from tests.support.gateway import Bus, FakeHost, GatewayHandle

pytestmark = pytest.mark.anyio


def _path(name: str) -> str:
    return "/images/" + quote(name, safe=":@")  # as the SDK encodes it: '/' becomes %2F


async def _until_status(client: httpx.AsyncClient, name: str, status: str) -> dict[str, object]:
    with anyio.fail_after(20):
        while True:
            response = await client.get(_path(name))
            if response.status_code == 200 and response.json()["status"] == status:
                return dict(response.json())
            await anyio.sleep(0.05)


async def test_pull_flow_by_short_and_full_name(gw: GatewayHandle, bus: Bus) -> None:
    host = FakeHost(bus.nc, bus.subjects.prefix, "puller")
    host.pull_delay_s = 1.0  # slower than the 2 s the gateway waits: the answer is pending
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        async with gw.async_client() as client:
            created = await client.post("/images", json={"name": "alpine"})
            assert created.status_code == 202
            body = created.json()
            assert body["name"] == "docker.io/library/alpine:latest"
            assert body["status"] in ("pending", "pulling")  # where the pull is after 2 s
            assert body["queue_position"] is None and body["size_bytes"] is None
            assert (await client.get("/images")).json() == []  # only ready images are listed
            ready = await _until_status(client, "docker.io/library/alpine:latest", "ready")
            assert ready["size_bytes"] == 10 << 20 and ready["cmd"] == ["/bin/sh"]
            again = await client.post("/images", json={"name": "docker.io/library/alpine"})
            assert (again.status_code, again.json()["status"]) == (202, "ready")
            assert [i["name"] for i in (await client.get("/images")).json()] == [
                "docker.io/library/alpine:latest"
            ]
            by_digest = await client.get(_path(f"alpine@{ready['digest']}"))
            assert by_digest.json()["name"] == f"docker.io/library/alpine@{ready['digest']}"
            assert (await client.get("/images/alpine:latest")).status_code == 200
            assert (
                await client.delete(_path("docker.io/library/alpine:latest"))
            ).status_code == 204
            assert (await client.get("/images/alpine")).status_code == 404
        tg.cancel_scope.cancel()


async def test_unknown_image_is_404_and_leaves_nothing(gw: GatewayHandle, bus: Bus) -> None:
    host = FakeHost(bus.nc, bus.subjects.prefix, "puller")
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        async with gw.async_client() as client:
            response = await client.post("/images", json={"name": host.missing})
            assert response.status_code == 404
            assert response.json() == {"code": "not_found", "message": "image not found"}
            kv = await bus.js.key_value(bus.subjects.images_bucket)
            with pytest.raises(Exception, match=r"not found|deleted"):
                await kv.get(image_key(host.missing))
        tg.cancel_scope.cancel()


async def test_concurrent_posts_send_one_pull(gw: GatewayHandle, bus: Bus) -> None:
    host = FakeHost(bus.nc, bus.subjects.prefix, "puller")
    host.pull_delay_s = 1.0
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        async with gw.async_client() as client:
            answers: list[httpx.Response] = []

            async def post() -> None:
                answers.append(await client.post("/images", json={"name": "busybox:1.36"}))

            async with anyio.create_task_group() as posts:
                for _ in range(5):
                    posts.start_soon(post)
        assert {r.status_code for r in answers} == {202}
        info = await bus.js.stream_info(bus.subjects.commands_stream)
        assert info.state.messages + info.state.first_seq - 1 == 1  # one PullImage, ever
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("name", ["Busybox", "a b", "x:y:z", "-x"])
async def test_bad_names_are_400_invalid_name(gw: GatewayHandle, name: str) -> None:
    async with gw.async_client() as client:
        created = await client.post("/images", json={"name": name})
        fetched = await client.get(_path(name))
    assert (created.status_code, created.json()["code"]) == (400, "invalid_name")
    assert fetched.json() == {"code": "invalid_name", "message": "invalid image reference"}


async def test_image_without_a_host_is_no_capacity(gw: GatewayHandle) -> None:
    async with gw.async_client() as client:
        response = await client.post("/images", json={"name": "alpine"})
    assert (response.status_code, response.json()["code"]) == (503, "no_capacity")


async def test_delete_by_digest_forgets_every_tag_of_it(gw: GatewayHandle, bus: Bus) -> None:
    """``repo@sha256:…`` names the tags of the repository that resolved to that digest:
    deleting it forgets them all, and the host that pulled it is asked to remove it (not
    while another tag still names the digest)."""
    host = FakeHost(bus.nc, bus.subjects.prefix, "puller")
    host.pull_delay_s = 0.05
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        async with gw.async_client() as client:
            for tag in ("alpine:latest", "alpine:3"):
                assert (await client.post("/images", json={"name": tag})).status_code == 202
                ready = await _until_status(client, f"docker.io/library/{tag}", "ready")
            digest = ready["digest"]
            assert (await client.delete(_path("alpine:3"))).status_code == 204
            assert host.deleted == []  # alpine:latest still names the digest
            assert (await client.delete(_path(f"alpine@{digest}"))).status_code == 204
            assert host.deleted == [digest]
            assert (await client.get("/images")).json() == []
            assert (await client.get("/images/alpine")).status_code == 404
            gone = await client.get(_path(f"alpine@{digest}"))
            assert gone.json() == {"code": "not_found", "message": "image not found"}
            again = await client.delete(_path(f"alpine@{digest}"))
            assert (again.status_code, again.json()["code"]) == (404, "not_found")
        tg.cancel_scope.cancel()


def test_delete_by_digest_removes_the_image_from_the_host(fleet: Fleet, busybox_image: str) -> None:
    """On a real worker: the image's disk and its tag in the host's OCI layout go too."""
    images = fleet.worker.data_dir / "images"
    repository = busybox_image.rpartition(":")[0]
    with fleet.api.client() as client:
        assert client.post("/images", json={"name": busybox_image}).status_code == 202
        deadline = time.monotonic() + 180
        while (found := client.get(_path(busybox_image))).json().get("status") != "ready":
            assert found.status_code == 200 and time.monotonic() < deadline, found.text
            time.sleep(0.2)
        digest = found.json()["digest"]
        disk = images / "disks" / digest.removeprefix("sha256:")
        assert (disk / "rootfs.ext4").exists()

        assert client.delete(_path(f"{repository}@{digest}")).status_code == 204

        assert busybox_image not in [i["name"] for i in client.get("/images").json()]
        assert client.get(_path(busybox_image)).status_code == 404
    assert not disk.exists()
    index = json.loads((images / "oci-cache" / "index.json").read_text())
    assert digest.removeprefix("sha256:") not in json.dumps(index)
