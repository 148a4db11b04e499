"""Two gateway replicas serve one fleet: what one writes, the other reads and changes; the
same create sent to both at once makes one instance."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from tests.gateway.conftest import Fleet
from tests.support.gateway import running_gateway

pytestmark = [pytest.mark.anyio, pytest.mark.vm]


async def _until(client: httpx.AsyncClient, path: str, check: object) -> httpx.Response:
    with anyio.fail_after(10):
        while not check(response := await client.get(path)):  # type: ignore[operator]
            await anyio.sleep(0.02)
    return response


async def test_two_replicas_share_the_fleet(fleet: Fleet, busybox_image: str) -> None:
    body = {"name": "shared", "image": busybox_image, "size": "256MB", "vcpus": 1}
    key = {"Idempotency-Key": "replicas-create-1"}
    with running_gateway(fleet.nats_url, fleet.prefix) as second:
        async with fleet.api.async_client() as a, second.async_client() as b:
            answers: list[httpx.Response] = []

            async def create(client: httpx.AsyncClient) -> None:
                answers.append(await client.post("/instances", json=body, headers=key))

            async with anyio.create_task_group() as tg:
                tg.start_soon(create, a)
                tg.start_soon(create, b)
            assert [r.status_code for r in answers] == [201, 201], [r.text for r in answers]
            instance_id = answers[0].json()["id"]
            assert answers[1].json()["id"] == instance_id
            assert len(fleet.worker.qemu_processes()) == 1

            seen = await _until(b, f"/instances/{instance_id}", lambda r: r.status_code == 200)
            assert _recorded(seen.json()) == _recorded(
                (await a.get(f"/instances/{instance_id}")).json()
            )
            assert (await b.post("/instances/shared/stop")).json()["state"] == "Stopped"
            await _until(a, "/instances/shared", lambda r: r.json()["state"] == "Stopped")

            volume = (await b.post("/volumes", json={"name": "both", "size_gb": 1})).json()
            await _until(a, f"/volumes/{volume['id']}", lambda r: r.status_code == 200)
            assert (await a.delete("/volumes/both")).status_code == 204
            await _until(b, f"/volumes/{volume['id']}", lambda r: r.status_code == 404)

            assert (await b.delete("/instances/shared")).status_code == 204
            await _until(a, f"/instances/{instance_id}", lambda r: r.status_code == 404)
            hosts_a, hosts_b = (await a.get("/hosts")).json(), (await b.get("/hosts")).json()
            assert (
                [h["id"] for h in hosts_a] == [h["id"] for h in hosts_b] == [fleet.worker.host_id]
            )
    assert fleet.worker.qemu_processes() == []


def _recorded(instance: dict[str, Any]) -> dict[str, Any]:
    """The instance as recorded: without the live phase's duration, which grows as it is read."""
    return {k: v for k, v in instance.items() if k != "phase_durations_ms"}
