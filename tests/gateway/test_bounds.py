"""Numbers that would reach a host's OS are bounded at the gateway: a 400 in hypeman's
error shape, never a 500 from the host."""

from __future__ import annotations

import pytest

from tests.support.gateway import GatewayHandle

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("size", ["101GB", "1000000TB"])
async def test_a_volume_mount_overlay_beyond_the_maximum_is_refused(
    gw: GatewayHandle, size: str
) -> None:
    mount = {"volume_id": "v1", "mount_path": "/data", "overlay": True, "overlay_size": size}
    body = {"name": "big", "image": "busybox", "volumes": [mount]}
    async with gw.async_client() as client:
        response = await client.post("/instances", json=body)
    assert response.status_code == 400, response.text
    assert response.json() == {
        "code": "invalid_overlay_size",
        "message": "overlay_size for volume v1 exceeds the maximum of 100GB",
    }
