"""A snapshot that keeps its VM running, under Cloud Hypervisor (its API double): pause,
``vm.snapshot``, the caller's copy while paused, ``vm.resume``; on a failed snapshot the VM
is resumed all the same and nothing is left of the save."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.errors import HypervisorError
from tests.support.ch import DOUBLE, RequestLog
from tests.worker.drivers.test_cloud_hypervisor import make_spec, without_info
from worker.drivers.base import VmState
from worker.drivers.cloud_hypervisor import CloudHypervisorDriver

pytestmark = pytest.mark.anyio


@pytest.fixture
def ch(ch_requests: RequestLog) -> CloudHypervisorDriver:
    return CloudHypervisorDriver(binary=str(DOUBLE), exit_timeout_s=5)


async def test_a_live_save_copies_while_paused_and_resumes(
    ch: CloudHypervisorDriver, ch_requests: RequestLog, vm_dir: Path, ch_kernel: Path
) -> None:
    spec = make_spec(vm_dir, ch_kernel)
    process = await ch.boot(spec, vmm_log=vm_dir / "logs" / "vmm.log")
    saved = vm_dir / "saved"
    saved.mkdir()
    seen: list[str] = []

    async def copy_disks() -> None:
        seen.append(str(await ch.state(spec, process)))

    try:
        await ch.save_live(spec, process, saved, copy_disks)
        assert seen == [str(VmState.PAUSED)]  # the copy ran while the VM was paused
        assert await ch.state(spec, process) is VmState.RUNNING
        assert sorted(p.name for p in saved.iterdir()) == [
            "config.json",
            "hypervisor.json",
            "memory-ranges",
            "state.json",
        ]
        calls = without_info(ch_requests.calls())
        assert calls[-4:] == ["GET vmm.ping", "PUT vm.pause", "PUT vm.snapshot", "PUT vm.resume"]
    finally:
        assert await ch.power_off(spec, process, timeout_s=5)


async def test_a_failed_live_save_resumes_the_vm(
    ch: CloudHypervisorDriver,
    ch_requests: RequestLog,
    vm_dir: Path,
    ch_kernel: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CH_DOUBLE_FAIL", "vm.snapshot")
    spec = make_spec(vm_dir, ch_kernel)
    process = await ch.boot(spec, vmm_log=vm_dir / "logs" / "vmm.log")
    saved = vm_dir / "saved"
    saved.mkdir()

    async def never() -> None:
        raise AssertionError("no copy after a failed save")

    try:
        with pytest.raises(HypervisorError, match=r"vm\.snapshot failed"):
            await ch.save_live(spec, process, saved, never)
        assert await ch.state(spec, process) is VmState.RUNNING
        assert not (saved / "hypervisor.json").exists()
    finally:
        assert await ch.power_off(spec, process, timeout_s=5)
