"""bridge mode end to end, inside a network namespace this test makes and removes
(tests/worker/network/namespace.py); the worker's engine runs there (bridge_probe.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.worker.network.namespace import run_probe_in_namespace
from worker.lifecycle.context import BootAssets

pytestmark = pytest.mark.anyio

PROBE = Path(__file__).with_name("bridge_probe.py")


@pytest.mark.vm
async def test_bridge_mode_in_a_namespace(
    data_dir: Path, boot_assets: BootAssets, busybox_image: str
) -> None:
    result = await run_probe_in_namespace(
        PROBE, data_dir, boot_assets, busybox_image, timeout_s=600
    )

    created = result["created"]
    assert created["ip"] == "10.123.0.2" and created["mac"].startswith("02:")
    assert created["tap"].startswith("vf") and len(created["tap"]) <= 15
    assert result["tap_on_bridge"]
    # The guest's own address, and the port mapping (DNAT) on local addresses.
    assert result["guest_ip"] == "hello-from-the-guest"
    assert result["dnat_gateway"] == "hello-from-the-guest"
    assert result["dnat_loopback"] == "hello-from-the-guest"
    # The guest reached another address inside the namespace (through its gateway).
    assert result["egress"] == "egress-ok"
    assert result["rules_while_running"] == 2  # prerouting + output
    # Health checks reach the guest at its own address and port, through the bridge.
    assert result["health"] == {"target": [created["ip"], 80], "status": "healthy", "error": None}
    # Standby: no TAP, the lease kept; restore: same TAP, IP and MAC, old connection alive.
    assert not result["tap_in_standby"] and result["lease_in_standby"]
    assert result["restored"] == created
    assert result["restored_nic"] == {"mac": created["mac"], "tap": created["tap"]}
    assert result["guest_ip_after_restore"] == "hello-from-the-guest"
    assert result["old_connection"].startswith("HTTP/1.") and " 200 " in result["old_connection"]
    assert result["dnat_after_restore"] == "hello-from-the-guest"
    # Asleep by its policy: no DNAT, the guest's address redirected to the worker (prerouting
    # + output); a new worker sets the redirect again, and one GET to the guest's own
    # address (not a mapped port) wakes it; then the kernel path (DNAT) is back.
    wake = result["wake"]
    assert wake["held"] and wake["rules_asleep"] == 2 and wake["dnat_asleep"] == 0
    assert wake["rules_after_restart"] == 2
    assert wake["page"] == [200, "hello-from-the-guest"]
    assert wake["state"] == "Running"
    assert wake["rules_awake"] == ["dnat", "dnat"]
    assert wake["page_awake"] == "hello-from-the-guest"
    assert wake["page_routed"] == repr(b"hello-from-the-guest\n")  # from a routed client
    assert wake["state_routed"] == "Running"
    # A wake that fails closes the caught connection and puts the redirect back; the next
    # connection wakes it.
    assert wake["failed_wake"] in ("RemoteProtocolError", "ReadError")
    assert wake["rules_after_failure"] == 2 and wake["state_after_failure"] == "Standby"
    assert wake["page_after_failure"] == [200, "hello-from-the-guest"]
    assert wake["state_after_retry"] == "Running"
    # Delete leaves nothing.
    assert result["taps_after_delete"] == []
    assert result["rules_after_delete"] == 0
    assert result["leases_after_delete"] == []
    # A dead instance's leftovers are gone once a new worker has started.
    assert result["ghost_left"] == {"tap": True, "rules": 2, "lease": True}
    assert result["ghost_after_restart"] == {"tap": False, "rules": 0, "lease": False}
