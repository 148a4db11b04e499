"""Limits an instance is created with take effect: ``disk_io_bps`` and, in bridge mode,
``network.bandwidth_download``/``bandwidth_upload``; user mode refuses bandwidth limits.
The stop/start part checks that a bridge-mode instance keeps its address while stopped.

Measured against an unlimited twin in the same run, never against a clock: the limited
guest's rates must stay below 1.5 times its limits (the limiters allow a short burst), the
free guest's must be above them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from schemas.errors import BadRequest
from tests.worker.conftest import MIB, create_command, wait_for_log
from tests.worker.network.limits_probe import LIMITS
from tests.worker.network.namespace import run_probe_in_namespace
from worker.engine import HostEngine
from worker.lifecycle.context import BootAssets

pytestmark = pytest.mark.anyio

PROBE = Path(__file__).with_name("limits_probe.py")


@pytest.mark.parametrize("field", ["bandwidth_download_bps", "bandwidth_upload_bps"])
async def test_user_mode_refuses_bandwidth_limits(
    engine: HostEngine, busybox_image: str, field: str
) -> None:
    cmd = create_command(busybox_image, **{field: 1 << 20})
    with pytest.raises(BadRequest) as refused:
        await engine.execute(cmd)
    assert refused.value.code == "not_supported"
    name = field.removesuffix("_bps")
    assert f"network.{name}" in str(refused.value) and "user network mode" in str(refused.value)
    assert list(engine.records()) == []


@pytest.mark.vm
async def test_limits_are_enforced_and_the_address_outlives_a_stop(
    data_dir: Path, boot_assets: BootAssets, busybox_image: str
) -> None:
    result = await run_probe_in_namespace(
        PROBE, data_dir, boot_assets, busybox_image, timeout_s=900
    )
    print("measured bytes/s:", json.dumps({k: result[k] for k in ("limited", "free")}))

    limits = {
        "disk": LIMITS["disk_io_bps"],
        "down": LIMITS["bandwidth_download_bps"],
        "up": LIMITS["bandwidth_upload_bps"],
    }
    for kind, limit in limits.items():
        assert 0 < result["limited"][kind] < limit * 1.5, (kind, result)
        assert result["free"][kind] > limit * 1.5, (kind, result)

    assert result["shapers_running"] == {"tbf_on_tap": True, "ingress_on_tap": True, "ifb": True}
    # Stopped: the address is still the instance's, and shown; the TAP and its shapers are gone.
    assert result["address_stopped"] == result["address_before"]
    assert result["address_stopped"]["ip"] and result["lease_stopped"]
    assert not any(result["shapers_stopped"].values())
    # Started again: the same address, shaped again.
    assert result["address_started"] == result["address_before"]
    assert result["shapers_started"] == result["shapers_running"]
    # Deleted: nothing left.
    assert not any(result["shapers_deleted"].values())
    assert result["leases_deleted"] == []


@pytest.mark.vm
async def test_hotplug_size_is_memory_the_guest_has(engine: HostEngine, busybox_image: str) -> None:
    cmd = create_command(
        busybox_image,
        cmd=["/bin/sh", "-c", "grep MemTotal /proc/meminfo; exec sleep 3600"],
        size_bytes=128 * MIB,
        hotplug_bytes=256 * MIB,
    )
    record = await engine.execute(cmd)
    assert record is not None and record.to_api().hotplug_size == "256.0 MB"
    log = await wait_for_log(engine.instance(record.id).guest.app_log, "MemTotal:")
    (kib,) = re.findall(r"MemTotal:\s+(\d+) kB", log)
    # What the kernel keeps for itself comes off the total; more than size alone is left.
    assert int(kib) * 1024 > 256 * MIB
