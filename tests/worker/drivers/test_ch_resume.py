"""Cloud Hypervisor: a saved VM resumed with other files under it (worker/resume.py's
driver step), against the CH API double. CH restores the devices its snapshot's
config.json names, so the driver restores from a copy whose config names the new files."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from schemas.errors import HypervisorError
from tests.support.ch import DOUBLE, RequestLog
from tests.worker.drivers.test_cloud_hypervisor import make_spec, without_info
from worker.drivers.base import VmSpec, VmState
from worker.drivers.ch_api import open_ch_api
from worker.drivers.cloud_hypervisor import CloudHypervisorDriver
from worker.resume import swap_spec

pytestmark = pytest.mark.anyio


@pytest.fixture
def driver(ch_requests: RequestLog) -> CloudHypervisorDriver:
    return CloudHypervisorDriver(binary=str(DOUBLE), exit_timeout_s=5, eject_timeout_s=10)


async def _saved_vm(
    driver: CloudHypervisorDriver, vm_dir: Path, ch_kernel: Path
) -> tuple[VmSpec, Path]:
    """A VM booted in ``vm_dir/a`` and snapshotted to ``vm_dir/snap``."""
    (vm_dir / "a").mkdir()
    saved = make_spec(vm_dir / "a", ch_kernel)
    process = await driver.boot(saved, vmm_log=vm_dir / "a" / "vmm.log")
    snapshot = vm_dir / "snap"
    snapshot.mkdir()
    await driver.snapshot(saved, process, snapshot)
    return saved, snapshot


async def test_a_saved_vm_resumes_on_other_files(
    driver: CloudHypervisorDriver, ch_requests: RequestLog, vm_dir: Path, ch_kernel: Path
) -> None:
    saved, snapshot = await _saved_vm(driver, vm_dir, ch_kernel)
    (vm_dir / "b").mkdir()
    other = make_spec(vm_dir / "b", ch_kernel)  # the new instance's files, same sizes
    spec = swap_spec(
        saved,
        instance_id="chnew",
        run_dir=other.run_dir,
        serial_log=other.serial_log,
        disks={d.id: d.path for d in other.disks},
    )
    resumed = await driver.restore_swapped(spec, saved, snapshot, vmm_log=vm_dir / "b" / "vmm.log")
    try:
        assert await driver.state(spec, resumed) is VmState.RUNNING
        assert without_info(ch_requests.calls())[-3:] == [
            "GET vmm.ping",
            "PUT vm.restore",
            "PUT vm.resume",
        ]
        async with open_ch_api(driver.api_socket(spec), timeout_s=5) as api:
            info = await api.get("vm.info", dict[str, Any])
        config = info["config"]
        assert [d["path"] for d in config["disks"]] == [d.path for d in other.disks]
        assert config["serial"]["file"] == other.serial_log
        # The snapshot itself is untouched (a template serves many), its copy gone.
        assert str(vm_dir / "a") in (snapshot / "config.json").read_text()
        assert not (Path(spec.run_dir) / "restore-source").exists()
    finally:
        assert await driver.power_off(spec, resumed, timeout_s=5)


async def test_a_disk_of_another_size_is_refused_before_a_vmm_starts(
    driver: CloudHypervisorDriver, ch_requests: RequestLog, vm_dir: Path, ch_kernel: Path
) -> None:
    saved, snapshot = await _saved_vm(driver, vm_dir, ch_kernel)
    (vm_dir / "b").mkdir()
    other = make_spec(vm_dir / "b", ch_kernel)
    Path(other.disks[1].path).write_bytes(b"\0" * 8192)
    spec = swap_spec(
        saved,
        instance_id="chnew",
        run_dir=other.run_dir,
        serial_log=other.serial_log,
        disks={d.id: d.path for d in other.disks},
    )
    calls = len(ch_requests.calls())
    with pytest.raises(HypervisorError, match="cannot give a restored VM's disk overlay"):
        await driver.restore_swapped(spec, saved, snapshot, vmm_log=vm_dir / "b" / "vmm.log")
    assert len(ch_requests.calls()) == calls
    shutil.rmtree(vm_dir / "b")
