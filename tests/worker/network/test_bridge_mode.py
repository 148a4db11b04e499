"""bridge mode end to end, inside a network namespace this test makes and removes.

Safety: every packet stays in the namespace ``vftest-<random>``; the host's own network
configuration is never touched. The worker's engine runs in the namespace
(bridge_probe.py); the image is pulled beforehand from the host side, because the test
registry listens on the host's loopback, which the namespace cannot reach (the cache then
answers the tag by itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from worker.images import ImageCache
from worker.lifecycle.context import BootAssets

pytestmark = pytest.mark.anyio

PROBE = Path(__file__).with_name("bridge_probe.py")
ROOT = Path(__file__).parents[3]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _remove_namespace(ns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.vm
async def test_bridge_mode_in_a_namespace(
    data_dir: Path, boot_assets: BootAssets, busybox_image: str
) -> None:
    if os.geteuid() != 0:
        pytest.fail("bridge mode needs root (network namespaces, TAPs, nftables)")
    await ImageCache(data_dir / "images").pull(busybox_image)
    ns = f"vftest-{secrets.token_hex(4)}"
    try:
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        args = {
            "data_dir": str(data_dir),
            "image": busybox_image,
            "kernel": str(boot_assets.kernel),
            "initrd": str(boot_assets.initrd),
            "accel": boot_assets.accel,
        }
        with anyio.fail_after(600):
            done = await anyio.run_process(
                ["ip", "netns", "exec", ns, sys.executable, str(PROBE), json.dumps(args)],
                check=False,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
    finally:
        _remove_namespace(ns)
    stdout, stderr = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"probe printed no result:\n{stdout}\n{stderr[-3000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert "error" not in result, json.dumps(result, indent=1)

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
    # Standby: no TAP, the lease kept; restore: same TAP, IP and MAC, old connection alive.
    assert not result["tap_in_standby"] and result["lease_in_standby"]
    assert result["restored"] == created
    assert result["restored_nic"] == {"mac": created["mac"], "tap": created["tap"]}
    assert result["guest_ip_after_restore"] == "hello-from-the-guest"
    assert result["old_connection"].startswith("HTTP/1.") and " 200 " in result["old_connection"]
    assert result["dnat_after_restore"] == "hello-from-the-guest"
    # Delete leaves nothing.
    assert result["taps_after_delete"] == []
    assert result["rules_after_delete"] == 0
    assert result["leases_after_delete"] == []
    # A dead instance's leftovers are gone once a new worker has started.
    assert result["ghost_left"] == {"tap": True, "rules": 2, "lease": True}
    assert result["ghost_after_restart"] == {"tap": False, "rules": 0, "lease": False}
