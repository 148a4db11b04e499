"""The instance API over HTTP on a real worker: idempotent create, state events and
``/wait``, volumes attached to a running VM, the worker's 4xx coming back unchanged."""

from __future__ import annotations

import io
import json
import tarfile

import anyio
import httpx
import pytest

from tests.gateway.conftest import Fleet

pytestmark = [pytest.mark.anyio, pytest.mark.vm]


async def _next_events(lines: object, count: int) -> list[tuple[int, dict[str, object]]]:
    """The next ``count`` (id, StateEvent) pairs of an /events stream."""
    found: list[tuple[int, dict[str, object]]] = []
    event_id = 0
    async for raw in lines:  # type: ignore[attr-defined]
        if raw.startswith("id: "):
            event_id = int(raw[4:])
        elif raw.startswith("data: "):
            found.append((event_id, json.loads(raw[6:])))
            if len(found) == count:
                return found
    raise AssertionError("the event stream ended")


async def test_instance_api_on_a_real_worker(fleet: Fleet, busybox_image: str) -> None:
    body = {"name": "http", "image": busybox_image, "size": "256MB", "vcpus": 1}
    key = {"Idempotency-Key": "create-http-1"}
    async with fleet.api.async_client() as client:
        first = await client.post("/instances", json=body, headers=key)
        assert first.status_code == 201, first.text
        again = await client.post("/instances", json=body, headers=key)
        assert (again.status_code, again.json()["id"]) == (201, first.json()["id"])
        instance_id = first.json()["id"]
        assert [i["id"] for i in (await client.get("/instances")).json()].count(instance_id) == 1
        assert len(fleet.worker.qemu_processes()) == 1

        await _events_and_wait(client, instance_id)
        # Hot-plug after a standby/restore: the restored device model takes new disks.
        await _volumes(client, instance_id)

        assert (await client.delete(f"/instances/{instance_id}")).status_code == 204
        assert (await client.get(f"/instances/{instance_id}")).status_code == 404
        assert (await client.post(f"/instances/{instance_id}/stop")).status_code == 404
    assert fleet.worker.qemu_processes() == []


async def _events_and_wait(client: httpx.AsyncClient, instance_id: str) -> None:
    params = {"instance": instance_id}
    async with client.stream("GET", "/events", params=params) as stream:
        await anyio.sleep(0.3)  # the stream starts with the next transition
        standby = await client.post(f"/instances/{instance_id}/standby", json={})
        assert standby.json()["state"] == "Standby"
        events = await _next_events(stream.aiter_lines(), 2)
    assert [(e["previous"], e["state"]) for _, e in events] == [
        ("Running", "Paused"),
        ("Paused", "Standby"),
    ]
    first_id = events[0][0]
    resumed_headers = {"Last-Event-ID": str(first_id)}
    async with client.stream("GET", "/events", params=params, headers=resumed_headers) as stream:
        (resumed,) = await _next_events(stream.aiter_lines(), 1)
    assert resumed == events[1]

    waited: list[httpx.Response] = []

    async def wait() -> None:
        waited.append(
            await client.get(f"/instances/{instance_id}/wait", params={"state": "Running"})
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.sleep(0.2)
        assert (await client.post(f"/instances/{instance_id}/restore")).status_code == 200
    assert waited[0].json() == {"state": "Running", "state_error": None, "timed_out": False}


async def _volumes(client: httpx.AsyncClient, instance_id: str) -> None:
    created = await client.post("/volumes", json={"name": "scratch", "size_gb": 1})
    assert created.status_code == 201, created.text
    volume_id = created.json()["id"]
    refused = await client.post(
        f"/instances/{instance_id}/volumes/scratch", json={"mount_path": "/etc/x"}
    )
    assert (refused.status_code, refused.json()["code"]) == (400, "invalid_mount_path")

    attached = await client.post(
        f"/instances/{instance_id}/volumes/scratch", json={"mount_path": "/mnt/scratch"}
    )
    assert attached.status_code == 200, attached.text
    assert attached.json()["volumes"] == [
        {"mount_path": "/mnt/scratch", "readonly": False, "volume_id": volume_id}
    ]
    in_use = await client.delete(f"/volumes/{volume_id}")
    assert (in_use.status_code, in_use.json()["code"]) == (409, "conflict")

    detached = await client.delete(f"/instances/{instance_id}/volumes/{volume_id}")
    assert detached.status_code == 200 and "volumes" not in detached.json(), detached.text
    assert (await client.delete(f"/volumes/{volume_id}")).status_code == 204
    assert (await client.get(f"/volumes/{volume_id}")).status_code == 404

    form = {"name": "seeded", "size_gb": "1", "id": "vol-seeded"}
    uploaded = await client.post("/volumes", data=form, files={"content": _archive()})
    assert uploaded.status_code == 201, uploaded.text
    assert (uploaded.json()["id"], uploaded.json()["size_gb"]) == ("vol-seeded", 1)
    again = await client.post("/volumes", data=form, files={"content": _archive()})
    assert (again.status_code, again.json()["code"]) == (409, "already_exists")
    not_gzip = await client.post(
        "/volumes/from-archive", params={"name": "x", "size_gb": 1}, content=b"not gzip"
    )
    assert (not_gzip.status_code, not_gzip.json()["code"]) == (400, "invalid_archive")
    assert (await client.delete("/volumes/seeded")).status_code == 204


def _archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("seed.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"seed"))
    return buffer.getvalue()
