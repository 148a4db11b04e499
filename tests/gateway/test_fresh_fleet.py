"""A fleet before and after its first heartbeat: GET /ready says whether it can take work,
an image pull says what it waits for, and a volume no host could hold is refused before
anything is sent."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import pytest

from tests.support.gateway import Bus, GatewayHandle, host_record

pytestmark = pytest.mark.anyio

GIB = 1 << 30


async def test_a_fresh_fleet_is_not_ready_and_says_why(gw: GatewayHandle) -> None:
    async with gw.async_client() as client:
        health = await client.get("/health")
        ready = await client.get("/ready")
        image = await client.post("/images", json={"name": "alpine"})
        volume = await client.post("/volumes", json={"name": "v", "size_gb": 1})
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "live_hosts": 0, "undrained_hosts": 0}
    assert (image.status_code, image.json()["code"]) == (503, "no_capacity")
    assert image.json()["message"].startswith("no live, undrained host to pull the image on")
    assert "first heartbeat" in image.json()["message"]
    assert "volume" in volume.json()["message"]


async def test_ready_once_a_host_heartbeats_and_huge_volumes_are_refused(
    gw: GatewayHandle, bus: Bus
) -> None:
    record = host_record(
        "roomy", heartbeat_at=datetime.now(UTC), disk_free_bytes=100 * GIB, disk_promised_bytes=0
    )
    await bus.put(bus.subjects.hosts_bucket, "roomy", record)
    try:
        async with gw.async_client() as client:
            with anyio.fail_after(10):
                while (ready := await client.get("/ready")).status_code != 200:
                    await anyio.sleep(0.05)
            assert ready.json() == {"ready": True, "live_hosts": 1, "undrained_hosts": 1}
            for size_gb in (101, 10**12, 2**62):
                response = await client.post("/volumes", json={"name": "v", "size_gb": size_gb})
                assert response.status_code == 503, (size_gb, response.text)
                assert response.json()["code"] == "no_capacity"
                assert "no host has room for a volume" in response.json()["message"]
            listed = await client.get("/volumes")
        assert listed.json() == []
    finally:
        await bus.delete(bus.subjects.hosts_bucket, "roomy")
