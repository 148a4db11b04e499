"""The Cloud Hypervisor driver against the CH API double (tests/support/ch_double.py).

These machines have no Cloud Hypervisor (and no KVM that boots a stock guest), so the
double stands in: it checks every request against CH's spec and keeps CH's VM state
machine, but runs no guest. Every test here ends by asserting that the spec refused none
of the driver's requests and that no double is left running (tests/worker/drivers/conftest.py).
scripts/check-cloud-hypervisor.sh checks the driver against the real CH on a KVM host.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from schemas.api import Hypervisor, InstanceState
from schemas.errors import HypervisorError
from schemas.messages import AttachVolume, DetachVolume, Restore, Standby, Start, Stop
from tests.support.ch import DOUBLE, RequestLog, sockets_in
from tests.support.ch_double import SPEC, Refused, Spec
from tests.worker.conftest import create_command, delete_all, now, wait_for_log
from worker.drivers.base import DiskSpec, NicSpec, VmSpec, VmState
from worker.drivers.ch_api import open_ch_api
from worker.drivers.cloud_hypervisor import CloudHypervisorDriver, build_vm_config
from worker.drivers.select import DriverSet
from worker.engine import HostEngine
from worker.guest.control import GuestControlError, guest_request
from worker.guest.vmlinux import has_pvh_entry, vmlinux_path
from worker.images import ImageCache
from worker.lifecycle.boot import CMDLINE
from worker.lifecycle.context import BootAssets, OpContext
from worker.network import NetworkSettings, user_nic
from worker.proc import spawn_vmm
from worker.storage import Storage
from worker.volumes import VolumeStore

pytestmark = pytest.mark.anyio

MIB = 1 << 20


def make_spec(vm_dir: Path, kernel: Path, **changes: Any) -> VmSpec:
    """A VM with the three boot disks, as the lifecycle builds it (files the double opens)."""
    for sub in ("run", "logs"):
        (vm_dir / sub).mkdir(exist_ok=True)
    initrd = vm_dir / "initrd.img"
    initrd.write_bytes(b"no guest unpacks this: the double runs none")
    disks = []
    for name, readonly in (("root", True), ("overlay", False), ("config", True)):
        path = vm_dir / f"{name}.img"
        path.write_bytes(b"\0" * 4096)
        disks.append(DiskSpec(id=name, path=str(path), readonly=readonly, serial=f"vmfleet-{name}"))
    values: dict[str, Any] = {
        "instance_id": "chtest",
        "vcpus": 2,
        "memory_bytes": 256 * MIB,
        "kernel": str(kernel),
        "initrd": str(initrd),
        "cmdline": CMDLINE,
        "disks": tuple(disks),
        "serial_log": str(vm_dir / "logs" / "app.log"),
        "run_dir": str(vm_dir / "run"),
        "hypervisor": "cloud-hypervisor",
    }
    values.update(changes)
    return VmSpec(**values)


@pytest.fixture
def driver(ch_requests: RequestLog) -> CloudHypervisorDriver:
    return CloudHypervisorDriver(binary=str(DOUBLE), exit_timeout_s=5, eject_timeout_s=10)


def without_info(calls: list[str]) -> list[str]:
    """The calls that change something (``vm.info`` polls left out)."""
    return [c for c in calls if c != "GET vm.info"]


# -- the lifecycle, driver by itself ---------------------------------------------------------


async def test_boot_creates_the_vm_its_spec_describes(
    driver: CloudHypervisorDriver, ch_requests: RequestLog, vm_dir: Path, ch_kernel: Path
) -> None:
    spec = make_spec(vm_dir, ch_kernel)
    process = await driver.boot(spec, vmm_log=vm_dir / "logs" / "vmm.log")
    try:
        assert await driver.state(spec, process) is VmState.RUNNING
        assert without_info(ch_requests.calls()) == ["GET vmm.ping", "PUT vm.create", "PUT vm.boot"]
        (config,) = ch_requests.bodies("vm.create")
        # The PVH vmlinux extracted from the bzImage, cached beside it.
        assert config["payload"]["kernel"] == str(vmlinux_path(ch_kernel))
        assert has_pvh_entry(Path(config["payload"]["kernel"]))
        cmdline = config["payload"]["cmdline"].split()
        assert cmdline[0] == "console=ttyS0" and cmdline[-1] == "vmfleet.ctl=hvc0"
        assert not any("ttyS1" in word for word in cmdline)
        assert config["cpus"] == {"boot_vcpus": 2, "max_vcpus": 2}
        # All of it from boot (size + hotplug_size): no virtio-mem region left unplugged.
        assert config["memory"] == {"size": 256 * MIB}
        root, overlay, conf = (str(vm_dir / f"{n}.img") for n in ("root", "overlay", "config"))
        assert config["disks"] == [  # in order; readonly only where true
            {"path": root, "readonly": True, "id": "root", "serial": "vmfleet-root"},
            {"path": overlay, "id": "overlay", "serial": "vmfleet-overlay"},
            {"path": conf, "readonly": True, "id": "config", "serial": "vmfleet-config"},
        ]
        assert config["serial"] == {"mode": "File", "file": spec.serial_log}
        assert config["console"] == {"mode": "Pty"}
        assert "net" not in config
        # The double's "boot output" on the serial file, and the control channel on the pty.
        await wait_for_log(Path(spec.serial_log), "[vmfleet] app started", timeout_s=10)
        assert driver.control_socket(spec).resolve().is_char_device()
        assert await guest_request(driver.control_socket(spec), "status", timeout_s=10) == (
            "running 1"
        )
    finally:
        assert await driver.power_off(spec, process, timeout_s=5)
    assert ch_requests.calls()[-2:] == ["PUT vm.shutdown", "PUT vmm.shutdown"]
    assert not process.running()
    assert sockets_in(vm_dir / "run") == []


async def test_standby_then_restore(
    driver: CloudHypervisorDriver, ch_requests: RequestLog, vm_dir: Path, ch_kernel: Path
) -> None:
    spec = make_spec(vm_dir, ch_kernel)
    vmm_log = vm_dir / "logs" / "vmm.log"
    process = await driver.boot(spec, vmm_log=vmm_log)
    snapshot = vm_dir / "snapshot"
    snapshot.mkdir()
    await driver.snapshot(spec, process, snapshot)
    assert not process.running()
    assert sockets_in(vm_dir / "run") == []
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "config.json",
        "hypervisor.json",
        "memory-ranges",
        "state.json",
    ]
    restored = await driver.restore(spec, snapshot, vmm_log=vmm_log)
    try:
        assert await driver.state(spec, restored) is VmState.RUNNING
        assert without_info(ch_requests.calls())[3:] == [
            "GET vmm.ping",
            "PUT vm.pause",
            "PUT vm.snapshot",
            "PUT vmm.shutdown",
            "GET vmm.ping",
            "PUT vm.restore",
            "PUT vm.resume",
        ]
        assert ch_requests.bodies("vm.snapshot") == [{"destination_url": f"file://{snapshot}"}]
        assert ch_requests.bodies("vm.restore") == [
            {"source_url": f"file://{snapshot}", "prefault": False}
        ]
        # CH truncates its serial file on restore; what the guest wrote before is kept.
        assert "[vmfleet] app started" in Path(spec.serial_log + ".1").read_text()
        assert await guest_request(driver.control_socket(spec), "settime 1", timeout_s=10) == "ok"
    finally:
        assert await driver.power_off(spec, restored, timeout_s=5)


async def test_restore_needs_the_version_that_took_the_snapshot(
    driver: CloudHypervisorDriver,
    ch_requests: RequestLog,
    vm_dir: Path,
    ch_kernel: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = make_spec(vm_dir, ch_kernel)
    monkeypatch.setenv("CH_DOUBLE_VERSION", "v48.0.0")
    process = await driver.boot(spec, vmm_log=vm_dir / "logs" / "vmm.log")
    snapshot = vm_dir / "snapshot"
    snapshot.mkdir()
    await driver.snapshot(spec, process, snapshot)
    monkeypatch.setenv("CH_DOUBLE_VERSION", "v49.0.0")  # the host's CH was upgraded
    with pytest.raises(HypervisorError, match=r"taken by cloud-hypervisor v48\.0\.0.*v49\.0\.0"):
        await driver.restore(spec, snapshot, vmm_log=vm_dir / "logs" / "vmm.log")
    assert "PUT vm.restore" not in ch_requests.calls()
    assert sockets_in(vm_dir / "run") == []


async def test_restore_refuses_a_snapshot_it_did_not_take(
    driver: CloudHypervisorDriver, ch_requests: RequestLog, vm_dir: Path, ch_kernel: Path
) -> None:
    snapshot = vm_dir / "snapshot"
    snapshot.mkdir()
    (snapshot / "memory").write_bytes(b"QEMU's migration stream")
    with pytest.raises(HypervisorError, match="no Cloud Hypervisor snapshot"):
        await driver.restore(make_spec(vm_dir, ch_kernel), snapshot, vmm_log=vm_dir / "vmm.log")
    assert ch_requests.calls() == []  # refused before any VMM started


async def test_hot_attach_then_detach(
    driver: CloudHypervisorDriver, ch_requests: RequestLog, vm_dir: Path, ch_kernel: Path
) -> None:
    spec = make_spec(vm_dir, ch_kernel)
    volume = vm_dir / "data.raw"
    volume.write_bytes(b"\0" * 4096)
    disk = DiskSpec(
        id="vol1", path=str(volume), readonly=False, serial="vmfleet-vol1", slot=1, volume_id="v1"
    )
    control = driver.control_socket(spec)
    process = await driver.boot(spec, vmm_log=vm_dir / "logs" / "vmm.log")
    try:
        await driver.attach_disk(spec, process, disk)
        assert ch_requests.bodies("vm.add-disk") == [
            {"path": str(volume), "id": "vol1", "serial": "vmfleet-vol1"}
        ]
        # The guest side is the lifecycle's, as for QEMU: mount by serial over the channel.
        mount = "mount serial:vmfleet-vol1 /data rw"
        assert await guest_request(control, mount, timeout_s=10) == "ok"
        assert await guest_request(control, "umount /data", timeout_s=10) == "ok"
        await driver.detach_disk(spec, process, disk)
        assert ch_requests.bodies("vm.remove-device") == [{"id": "vol1"}]
        async with open_ch_api(driver.api_socket(spec)) as api:
            info = await api.info()
        assert "vol1" not in (info.device_tree or {})
        with pytest.raises(GuestControlError, match="did not appear"):
            await guest_request(control, mount, timeout_s=10)
    finally:
        assert await driver.power_off(spec, process, timeout_s=5)


async def test_disk_io_bps_is_a_rate_limiter_on_every_disk(
    driver: CloudHypervisorDriver, ch_requests: RequestLog, vm_dir: Path, ch_kernel: Path
) -> None:
    spec = make_spec(vm_dir, ch_kernel, disk_io_bps=100 * MIB)
    volume = vm_dir / "data.raw"
    volume.write_bytes(b"\0" * 4096)
    disk = DiskSpec(id="vol1", path=str(volume), readonly=False, serial="vmfleet-vol1", slot=1)
    # hypeman's bucket: the rate each second, plus a one-time burst of three seconds' worth.
    limiter = {"bandwidth": {"size": 100 * MIB, "refill_time": 1000, "one_time_burst": 300 * MIB}}
    process = await driver.boot(spec, vmm_log=vm_dir / "logs" / "vmm.log")
    try:
        await driver.attach_disk(spec, process, disk)
        (config,) = ch_requests.bodies("vm.create")
        assert [d["rate_limiter_config"] for d in config["disks"]] == [limiter] * 3
        (added,) = ch_requests.bodies("vm.add-disk")
        assert added["rate_limiter_config"] == limiter
    finally:
        assert await driver.power_off(spec, process, timeout_s=5)


# -- error paths: nothing is left behind ------------------------------------------------------


async def test_power_off_leaves_a_vmm_that_does_not_exit_to_be_killed(
    driver: CloudHypervisorDriver,
    ch_requests: RequestLog,
    vm_dir: Path,
    ch_kernel: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CH_DOUBLE_HANG", "1")  # answers vmm.shutdown, stays
    spec = make_spec(vm_dir, ch_kernel)
    process = await driver.boot(spec, vmm_log=vm_dir / "logs" / "vmm.log")
    assert await driver.power_off(spec, process, timeout_s=0.5) is False
    assert process.running()
    assert ch_requests.calls()[-2:] == ["PUT vm.shutdown", "PUT vmm.shutdown"]
    await process.kill_and_reap()  # what the lifecycle's stop does next
    assert sockets_in(vm_dir / "run") == []


async def test_a_vmm_whose_socket_never_appears_is_killed(
    ch_requests: RequestLog, vm_dir: Path, ch_kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CH_DOUBLE_NO_SOCKET", "1")
    driver = CloudHypervisorDriver(binary=str(DOUBLE), ready_timeout_s=1)
    spec = make_spec(vm_dir, ch_kernel)
    with pytest.raises(HypervisorError, match="did not start") as caught:
        await driver.boot(spec, vmm_log=vm_dir / "logs" / "vmm.log")
    assert "a test double of Cloud Hypervisor" in str(caught.value)  # the vmm.log tail
    assert sockets_in(vm_dir / "run") == []


async def test_a_failed_boot_leaves_nothing_behind(
    driver: CloudHypervisorDriver,
    ch_requests: RequestLog,
    vm_dir: Path,
    ch_kernel: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CH_DOUBLE_FAIL", "vm.boot")
    spec = make_spec(vm_dir, ch_kernel)
    with pytest.raises(HypervisorError, match=r"vm\.boot failed with status 500"):
        await driver.boot(spec, vmm_log=vm_dir / "logs" / "vmm.log")
    assert sockets_in(vm_dir / "run") == []


async def test_a_failed_snapshot_resumes_the_vm(
    driver: CloudHypervisorDriver,
    ch_requests: RequestLog,
    vm_dir: Path,
    ch_kernel: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CH_DOUBLE_FAIL", "vm.snapshot")
    spec = make_spec(vm_dir, ch_kernel)
    process = await driver.boot(spec, vmm_log=vm_dir / "logs" / "vmm.log")
    snapshot = vm_dir / "snapshot"
    snapshot.mkdir()
    try:
        with pytest.raises(HypervisorError, match=r"vm\.snapshot failed"):
            await driver.snapshot(spec, process, snapshot)
        assert process.running()
        assert await driver.state(spec, process) is VmState.RUNNING
        assert without_info(ch_requests.calls())[-3:] == [
            "PUT vm.pause",
            "PUT vm.snapshot",
            "PUT vm.resume",
        ]
        assert not (snapshot / "hypervisor.json").exists()
    finally:
        assert await driver.power_off(spec, process, timeout_s=5)


async def test_user_mode_networking_is_refused_before_a_vmm_starts(
    driver: CloudHypervisorDriver, ch_requests: RequestLog, vm_dir: Path, ch_kernel: Path
) -> None:
    spec = make_spec(vm_dir, ch_kernel, nics=(user_nic("chtest", [], NetworkSettings()),))
    with pytest.raises(HypervisorError, match="no user-mode networking"):
        await driver.boot(spec, vmm_log=vm_dir / "logs" / "vmm.log")
    assert ch_requests.calls() == []


# -- the double's spec checking ------------------------------------------------------------


def test_a_bridge_nic_is_its_tap_and_mac_and_the_config_fits_the_spec(
    vm_dir: Path, ch_kernel: Path
) -> None:
    nic = NicSpec(id="net0", mac="02:00:00:12:34:56", mode="tap", tap="vfabc123")
    spec = make_spec(vm_dir, ch_kernel, nics=(nic,))
    config = build_vm_config(spec, kernel=vmlinux_path(ch_kernel))
    body = msgspec.json.encode(config)
    # ip/mask are the host side of the TAP: left out (the TAP exists, on the bridge).
    assert msgspec.json.decode(body)["net"] == [
        {"tap": "vfabc123", "mac": "02:00:00:12:34:56", "id": "net0"}
    ]
    Spec(SPEC).check_request("PUT", "vm.create", "application/json", body)


def test_the_spec_check_catches_a_wrong_body() -> None:
    spec = Spec(SPEC)
    good = {"payload": {"kernel": "/k"}, "memory": {"size": 1 << 28}}
    spec.check_request("PUT", "vm.create", "application/json", msgspec.json.encode(good))
    wrong = [
        {"payload": {"kernel": 7}},  # a path is a string
        {"payload": {"kernel": "/k"}, "memory": {"size": 1, "hotplug_sise": 2}},  # a typo
        {"payload": {"kernel": "/k"}, "serial": {"mode": "Serial"}},  # not in the enum
        {"cpus": {"boot_vcpus": 1, "max_vcpus": 1}},  # payload is required
    ]
    for body in wrong:
        with pytest.raises(Refused) as refused:
            spec.check_request("PUT", "vm.create", "application/json", msgspec.json.encode(body))
        assert refused.value.status == 400


@pytest.fixture
async def bare_double(ch_requests: RequestLog, vm_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The double on its own, spoken to with plain HTTP."""
    socket = vm_dir / "ch.sock"
    process = await spawn_vmm(
        [str(DOUBLE), "--api-socket", str(socket)], log_path=vm_dir / "vmm.log", socket_path=socket
    )
    transport = httpx.AsyncHTTPTransport(uds=str(socket))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost/api/v1/"
        ) as client:
            yield client
    finally:
        await process.kill_and_reap()
        socket.unlink(missing_ok=True)


async def test_the_double_answers_4xx_to_what_the_spec_does_not_allow(
    bare_double: httpx.AsyncClient, ch_requests: RequestLog
) -> None:
    ch_requests.refusals_expected = True
    json_body = {"Content-Type": "application/json"}
    refused = {
        "a wrong type": ("PUT", "vm.create", b'{"payload": {"kernel": 7}}', json_body),
        "a misspelt field": ("PUT", "vm.create", b'{"payload": {}, "memroy": {}}', json_body),
        "a body where none is allowed": ("PUT", "vm.boot", b"{}", json_body),
        "no body where one is required": ("PUT", "vm.snapshot", b"", {}),
        "not JSON": ("PUT", "vm.add-disk", b"path=/x", {"Content-Type": "text/plain"}),
        "a method the path lacks": ("GET", "vm.create", b"", {}),
        "a path the spec lacks": ("PUT", "vm.frobnicate", b"", {}),
    }
    for why, (method, endpoint, content, headers) in refused.items():
        response = await bare_double.request(method, endpoint, content=content, headers=headers)
        assert 400 <= response.status_code < 500, why
    create = b'{"payload": {"kernel": "/k"}, "memory": {"size": 268435456}}'
    accepted = await bare_double.put("vm.create", content=create, headers=json_body)
    assert accepted.status_code == 204
    assert len(ch_requests.refused()) == len(refused)
    assert all(entry.get("error") for entry in ch_requests.refused())


# -- through the host engine -----------------------------------------------------------------


@pytest.fixture
async def ch_engine(
    data_dir: Path, ch_kernel: Path, ch_requests: RequestLog
) -> AsyncIterator[HostEngine]:
    initrd = data_dir / "initrd.img"
    initrd.write_bytes(b"no guest unpacks this: the double runs none")
    ctx = OpContext(
        host_id="test-host",
        storage=Storage(data_dir),
        driver=DriverSet(CloudHypervisorDriver(binary=str(DOUBLE)), {}),
        images=ImageCache(data_dir / "images"),
        volumes=VolumeStore(data_dir, "test-host"),
        boot=BootAssets(kernel=ch_kernel, initrd=initrd, accel="kvm"),
    )
    engine = HostEngine(ctx)
    try:
        yield engine
    finally:
        await delete_all(engine)


async def test_the_lifecycle_through_the_host_engine(
    ch_engine: HostEngine, busybox_image: str, ch_requests: RequestLog
) -> None:
    engine = ch_engine
    cmd = create_command(
        busybox_image, hypervisor=Hypervisor.CLOUD_HYPERVISOR, network_enabled=False
    )
    iid = cmd.instance_id
    record = await engine.execute(cmd)
    assert record is not None and record.state is InstanceState.RUNNING
    inst = engine.instance(iid)
    assert inst.spec is not None and inst.spec.hypervisor == "cloud-hypervisor"
    await wait_for_log(inst.guest.app_log, "[vmfleet] app started", timeout_s=10)

    record = await engine.execute(Standby(id="sb", instance_id=iid, issued_at=now()))
    assert record is not None and record.state is InstanceState.STANDBY and record.has_snapshot
    assert (inst.guest.snapshot / "hypervisor.json").is_file()
    record = await engine.execute(Restore(id="rs", instance_id=iid, issued_at=now()))
    assert record is not None and record.state is InstanceState.RUNNING
    assert not record.has_snapshot

    await engine.ctx.volumes.create("vol-ch", "data", 1)
    attach = AttachVolume(
        id="at",
        instance_id=iid,
        issued_at=now(),
        volume_id="vol-ch",
        mount_path="/mnt/data",
        readonly=False,
    )
    record = await engine.execute(attach)
    assert record is not None and [v.mount_path for v in record.volumes] == ["/mnt/data"]
    detach = DetachVolume(id="dt", instance_id=iid, issued_at=now(), volume_id="vol-ch")
    record = await engine.execute(detach)
    assert record is not None and record.volumes == []

    # A worker started again adopts the running VMM, found by its API socket.
    successor = HostEngine(engine.ctx)
    await successor.recover()
    assert successor.get(iid).state is InstanceState.RUNNING
    assert successor.instance(iid).process is not None

    # Stop goes through the guest's init over the console pty; the VMM exits by itself.
    before = len(ch_requests.calls())
    record = await engine.execute(Stop(id="st", instance_id=iid, issued_at=now()))
    assert record is not None and record.state is InstanceState.STOPPED
    assert ch_requests.calls()[before:] == []  # no vm.shutdown, no kill was needed
    record = await engine.execute(Start(id="go", instance_id=iid, issued_at=now()))
    assert record is not None and record.state is InstanceState.RUNNING
    assert ch_requests.calls().count("PUT vm.boot") == 2


async def test_stop_kills_a_guest_that_does_not_power_off(
    ch_engine: HostEngine,
    busybox_image: str,
    ch_requests: RequestLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The guest ignores "shutdown" and CH ignores vmm.shutdown: only SIGKILL is left.
    monkeypatch.setenv("CH_DOUBLE_HANG", "1")
    cmd = create_command(
        busybox_image, hypervisor=Hypervisor.CLOUD_HYPERVISOR, network_enabled=False
    )
    await ch_engine.execute(cmd)
    inst = ch_engine.instance(cmd.instance_id)
    record = await ch_engine.execute(Stop(id="st", instance_id=cmd.instance_id, issued_at=now()))
    assert record is not None and record.state is InstanceState.STOPPED
    assert inst.process is None
    assert ch_requests.calls()[-2:] == ["PUT vm.shutdown", "PUT vmm.shutdown"]
    assert "killing the VMM" in inst.guest.ops_log.read_text()
    assert sockets_in(inst.guest.run_dir) == []
