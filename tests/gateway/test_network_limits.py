"""Bandwidth limits are placed on a host that can enforce them (bridge mode), and refused
with 400 not_supported when every host networks in user mode."""

from __future__ import annotations

import pytest

from tests.gateway.test_placement_routes import GIB, Host, accept, create_on
from tests.support.gateway import Bus, GatewayHandle

pytestmark = pytest.mark.anyio

LIMITED = {"network": {"bandwidth_download": "1MB/s", "bandwidth_upload": "1MB/s"}}


async def test_user_mode_fleet_refuses_bandwidth_limits(gw: GatewayHandle, bus: Bus) -> None:
    user = Host(bus, "user", accept, network_mode="user")
    response, sent = await create_on(gw, bus, [user], **LIMITED)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "not_supported"
    assert "network.bandwidth_download" in body["message"] and "user" in body["message"]
    assert sent == {"user": 0}


async def test_bandwidth_limits_go_to_a_bridge_mode_host(gw: GatewayHandle, bus: Bus) -> None:
    # The roomier host runs user mode: without limits it would be chosen.
    user = Host(bus, "user", accept, network_mode="user", memory_total_bytes=64 * GIB)
    bridge = Host(bus, "bridge", accept, network_mode="bridge")
    response, sent = await create_on(gw, bus, [user, bridge], **LIMITED)
    assert response.status_code == 201, response.text
    assert response.json()["host"] == "bridge"
    assert sent == {"user": 0, "bridge": 1}
