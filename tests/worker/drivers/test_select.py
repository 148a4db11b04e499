"""Choosing the host's hypervisor (VMFLEET_HYPERVISOR), with the CH double as the binary.

The Cloud Hypervisor probe boots under the double, which prints the probe marker for
``vmfleet.probe=1`` (or nothing, with CH_DOUBLE_KVM=broken, as on a host whose KVM does not
run guests). QEMU's own accelerator probe is not under test here and is replaced.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cli.daemons import hypervisor_refusals
from cli.settings import ConfigError, load_settings
from natsbus import BusOptions
from schemas.api import Hypervisor
from schemas.errors import HypervisorError
from tests.support.ch import DOUBLE, RequestLog
from worker import WorkerConfig, run_worker
from worker.drivers import select
from worker.drivers.base import VmSpec
from worker.drivers.cloud_hypervisor import CloudHypervisorDriver
from worker.drivers.qemu import QemuDriver
from worker.drivers.select import DriverSet, HostHypervisor, HypervisorUnavailable
from worker.heartbeat import host_record
from worker.host import HostUsage

pytestmark = pytest.mark.anyio


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch, ch_requests: RequestLog) -> None:
    """The double is the ``cloud-hypervisor`` on PATH."""
    monkeypatch.setenv("PATH", f"{DOUBLE.parent}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture
def no_qemu_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    async def tcg(*args: object, **kwargs: object) -> str:
        return "tcg"

    monkeypatch.setattr(select, "choose_accel", tcg)


async def choose(setting: str, vm_dir: Path, kernel: Path, **changes: object) -> HostHypervisor:
    initrd = vm_dir / "initrd.img"
    if not initrd.exists():  # unchanged across calls, so the probe's cache holds
        initrd.write_bytes(b"no guest unpacks this: the double runs none")
    values: dict[str, object] = {
        "network_mode": "bridge",
        "ch_binary": None,
        "assets_dir": vm_dir / "assets",
        "kernel": kernel,
        "initrd": initrd,
        "probe_timeout_s": 2.0,
    }
    values.update(changes)
    return await select.choose_hypervisor(setting, **values)  # type: ignore[arg-type]


async def test_auto_picks_cloud_hypervisor_when_a_probe_guest_boots(
    on_path: None, ch_requests: RequestLog, vm_dir: Path, ch_kernel: Path
) -> None:
    host = await choose("auto", vm_dir, ch_kernel)
    assert host.drivers.name == "cloud-hypervisor" and host.accel == "kvm"
    (probe,) = ch_requests.bodies("vm.create")
    assert "vmfleet.probe=1" in probe["payload"]["cmdline"]
    cached = json.loads((vm_dir / "assets" / "system" / "ch-probe.json").read_text())
    assert cached["ok"] is True
    # The answer is cached: a second start boots no probe.
    before = len(ch_requests.calls())
    assert (await choose("auto", vm_dir, ch_kernel)).drivers.name == "cloud-hypervisor"
    assert len(ch_requests.calls()) == before


async def test_auto_takes_qemu_when_no_probe_guest_boots(
    on_path: None,
    no_qemu_probe: None,
    ch_requests: RequestLog,
    vm_dir: Path,
    ch_kernel: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CH_DOUBLE_KVM", "broken")
    host = await choose("auto", vm_dir, ch_kernel)
    assert host.drivers.name == "qemu" and host.accel == "tcg"
    cached = json.loads((vm_dir / "assets" / "system" / "ch-probe.json").read_text())
    assert cached["ok"] is False and "did not boot" in cached["reason"]


async def test_auto_takes_qemu_in_user_mode_without_asking_cloud_hypervisor(
    on_path: None, no_qemu_probe: None, ch_requests: RequestLog, vm_dir: Path, ch_kernel: Path
) -> None:
    host = await choose("auto", vm_dir, ch_kernel, network_mode="user")
    assert host.drivers.name == "qemu"
    assert ch_requests.calls() == []


@pytest.mark.parametrize(
    ("network_mode", "binary", "knob", "reason"),
    [
        ("user", "double", None, "needs VMFLEET_NETWORK=bridge"),
        ("bridge", "missing", None, "is not an executable file"),
        ("bridge", "double", "broken", "a probe guest did not boot"),
    ],
)
async def test_a_forced_cloud_hypervisor_that_cannot_run_is_refused_in_one_line(
    ch_requests: RequestLog,
    vm_dir: Path,
    ch_kernel: Path,
    monkeypatch: pytest.MonkeyPatch,
    network_mode: str,
    binary: str,
    knob: str | None,
    reason: str,
) -> None:
    if knob is not None:
        monkeypatch.setenv("CH_DOUBLE_KVM", knob)
    ch_binary = DOUBLE if binary == "double" else vm_dir / "no-such-binary"
    with pytest.raises(HypervisorUnavailable, match=reason) as refused:
        await choose(
            "cloud-hypervisor", vm_dir, ch_kernel, network_mode=network_mode, ch_binary=ch_binary
        )
    message = str(refused.value)
    assert message.startswith("VMFLEET_HYPERVISOR=cloud-hypervisor") and "\n" not in message


async def test_the_worker_refuses_before_it_touches_anything(vm_dir: Path) -> None:
    config = WorkerConfig(
        host_id="h1",
        data_dir=vm_dir / "data",
        bus=BusOptions(urls=("nats://127.0.0.1:1",)),
        hypervisor="cloud-hypervisor",
    )
    with pytest.raises(ConfigError, match="has no user-mode networking"), hypervisor_refusals():
        await run_worker(config)  # user mode: refused before NATS or any asset


def test_vmfleet_ch_binary_must_be_an_executable(vm_dir: Path) -> None:
    assert load_settings({"VMFLEET_CH_BINARY": str(DOUBLE)}).ch_binary == DOUBLE
    (vm_dir / "plain").write_text("")
    with pytest.raises(ConfigError, match=r"VMFLEET_CH_BINARY: .* is not executable"):
        load_settings({"VMFLEET_CH_BINARY": str(vm_dir / "plain")})


# -- every VM with the hypervisor that made it --------------------------------------------


def spec_for(hypervisor: str, vm_dir: Path) -> VmSpec:
    return VmSpec(
        instance_id="i1",
        vcpus=1,
        memory_bytes=1 << 28,
        kernel="/k",
        initrd="/i",
        cmdline="console=ttyS0",
        disks=(),
        serial_log=str(vm_dir / "app.log"),
        run_dir=str(vm_dir / "run"),
        hypervisor=hypervisor,
    )


async def test_a_vm_stays_with_the_hypervisor_that_made_it(vm_dir: Path) -> None:
    ch = CloudHypervisorDriver(binary=str(DOUBLE))
    made: list[str] = []

    def qemu() -> QemuDriver:
        made.append("qemu")
        return QemuDriver(binary="/usr/bin/false")

    drivers = DriverSet(ch, {"qemu": qemu})
    assert drivers.name == "cloud-hypervisor"
    assert drivers.driver_for(spec_for("cloud-hypervisor", vm_dir)) is ch
    # Socket paths need no driver (recovery asks them of every VM).
    assert drivers.api_socket(spec_for("qemu", vm_dir)) == vm_dir / "run" / "qmp.sock"
    assert (
        drivers.control_socket(spec_for("cloud-hypervisor", vm_dir)) == vm_dir / "run" / "ctl.pty"
    )
    assert made == []
    assert isinstance(drivers.driver_for(spec_for("qemu", vm_dir)), QemuDriver)
    assert made == ["qemu"]


async def test_a_vm_whose_hypervisor_is_gone_fails_in_one_line(vm_dir: Path) -> None:
    def gone() -> QemuDriver:
        raise HypervisorError("qemu-system-x86_64 not found")

    drivers = DriverSet(CloudHypervisorDriver(binary=str(DOUBLE)), {"qemu": gone})
    with pytest.raises(HypervisorError, match="runs under qemu, not available here: qemu-sys"):
        await drivers.resume(spec_for("qemu", vm_dir), None)  # type: ignore[arg-type]


def test_the_heartbeat_names_the_hypervisor_in_use(vm_dir: Path) -> None:
    config = WorkerConfig(host_id="h1", data_dir=vm_dir, bus=BusOptions(urls=("nats://x:1",)))
    record = host_record(
        config, datetime.now(UTC), HostUsage(accel="kvm"), [Hypervisor.CLOUD_HYPERVISOR]
    )
    assert record.hypervisors == [Hypervisor.CLOUD_HYPERVISOR] and record.accel == "kvm"
