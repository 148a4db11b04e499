"""Which templates may be used (no VM): a stale one never is, a half-made one never is, and
the resume refuses a device model other than the saved one."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import cast

import anyio
import msgspec
import pytest

from schemas.errors import HypervisorError
from worker.drivers.base import DiskSpec, Hypervisor, NicSpec, VmSpec
from worker.guest import GuestNetwork
from worker.lifecycle.context import BootAssets
from worker.resume import GuestIdentity, ResumeError, identity_request, swap_spec
from worker.templates import TemplateManager
from worker.templates.build import template_spec
from worker.templates.store import (
    HostIdentity,
    TemplateManifest,
    TemplateShape,
    TemplateStore,
    template_key,
)

pytestmark = pytest.mark.anyio

SHAPE = TemplateShape(memory_bytes=256 << 20, vcpus=1, network=True)
HOST = HostIdentity(
    kernel="/assets/vmlinuz",
    kernel_sha256="k1",
    initrd="/assets/initrd",
    initrd_sha256="i1",
    vmm="qemu",
    vmm_version="QEMU emulator version 7.2.22",
    accel="tcg",
)
BOOT = BootAssets(kernel=Path("/assets/vmlinuz"), initrd=Path("/assets/initrd"), accel="tcg")


def _publish(store: TemplateStore, shape: TemplateShape, host: HostIdentity) -> str:
    """A complete template on disk, as a build leaves it (memory contents do not matter)."""
    key = template_key(shape, host)
    build = store.build_dir(key)
    spec = template_spec(shape, BOOT, "qemu", build)
    (build / "memory").write_bytes(b"saved")
    (build / "vm.json").write_bytes(msgspec.json.encode(spec))
    manifest = TemplateManifest(
        key=key, shape=shape, host=host, built_at=0.0, build_seconds=1.0, size_bytes=5
    )
    store.publish(build, manifest)
    return key


def test_a_current_template_is_found(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    key = _publish(store, SHAPE, HOST)
    template = store.find(SHAPE, HOST)
    assert template is not None and template.manifest.key == key
    assert template.saved.directory == str(tmp_path / key)


@pytest.mark.parametrize(
    "changed",
    [
        {"kernel_sha256": "k2"},
        {"initrd_sha256": "i2"},
        {"vmm_version": "QEMU emulator version 8.2.0"},
    ],
)
def test_a_template_of_another_kernel_initrd_or_vmm_is_never_used(
    tmp_path: Path, changed: dict[str, str]
) -> None:
    store = TemplateStore(tmp_path)
    _publish(store, SHAPE, HOST)
    now = msgspec.structs.replace(HOST, **changed)
    assert store.find(SHAPE, now) is None
    store.sweep(now)  # what a worker does at start: the stale one is gone
    assert list(tmp_path.iterdir()) == []


def test_a_manifest_that_does_not_match_its_key_is_removed(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    key = _publish(store, SHAPE, HOST)
    # A template dir whose manifest says another host (tampered, or a bug): not used.
    manifest = msgspec.json.decode(
        (tmp_path / key / "template.json").read_bytes(), type=TemplateManifest
    )
    stale = msgspec.structs.replace(manifest, host=msgspec.structs.replace(HOST, kernel_sha256="x"))
    (tmp_path / key / "template.json").write_bytes(msgspec.json.encode(stale))
    assert store.find(SHAPE, HOST) is None
    assert not (tmp_path / key).exists()


def test_a_build_cut_short_is_never_used_and_swept(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    key = template_key(SHAPE, HOST)
    build = store.build_dir(key)
    (build / "memory").write_bytes(b"half")  # killed before the manifest and the rename
    assert store.find(SHAPE, HOST) is None
    store.sweep(HOST)
    assert list(tmp_path.iterdir()) == []


def test_eviction_keeps_the_budget_least_recently_used_first(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    old = _publish(store, SHAPE, HOST)
    other = TemplateShape(memory_bytes=512 << 20, vcpus=1, network=True)
    new = _publish(store, other, HOST)
    found = store.find(other, HOST)
    assert found is not None
    store.mark_used(found)
    assert store.evict_for(5, budget=10)
    assert not (tmp_path / old).exists() and (tmp_path / new).exists()
    assert not store.evict_for(20, budget=10)


def _saved(tmp_path: Path) -> VmSpec:
    return template_spec(SHAPE, BOOT, "qemu", tmp_path)


def test_swap_spec_puts_the_new_files_under_the_same_devices(tmp_path: Path) -> None:
    saved = _saved(tmp_path)
    spec = swap_spec(
        saved,
        instance_id="i1",
        run_dir="/data/guests/i1/run",
        serial_log="/data/guests/i1/logs/app.log",
        disks={"root": "/img/disk.ext4", "overlay": "/g/overlay", "config": "/g/config"},
        nics=(NicSpec(id="net0", mac="02:aa:bb:cc:dd:ee", mode="user"),),
    )
    assert [d.path for d in spec.disks] == ["/img/disk.ext4", "/g/overlay", "/g/config"]
    assert [(d.id, d.readonly, d.serial) for d in spec.disks] == [
        (d.id, d.readonly, d.serial) for d in saved.disks
    ]
    assert spec.nics[0].mac == "02:aa:bb:cc:dd:ee" and spec.cmdline == saved.cmdline


def test_swap_spec_refuses_another_device_model(tmp_path: Path) -> None:
    saved = _saved(tmp_path)
    files = {"root": "/a", "overlay": "/b", "config": "/c"}
    kept = swap_spec(saved, disks={"root": "/a"}, instance_id="i1", run_dir="/r", serial_log="/l")
    assert [d.path for d in kept.disks] == ["/a", *(d.path for d in saved.disks[1:])]
    with pytest.raises(ResumeError, match="has no disk"):
        swap_spec(
            saved, disks={**files, "vol": "/v"}, instance_id="i1", run_dir="/r", serial_log="/l"
        )
    with pytest.raises(ResumeError, match="devices differ"):
        swap_spec(
            saved, disks=files, nics=(), instance_id="i1", run_dir="/r", serial_log="/l"
        )  # the saved VM has a NIC
    with pytest.raises(ResumeError, match="devices differ"):
        other = DiskSpec(id="root", path="/a", readonly=False, serial="vmfleet-root")
        swap_spec(
            saved, disks={**files, "root": other}, instance_id="i1", run_dir="/r", serial_log="/l"
        )


def test_the_identity_line_the_guest_is_sent() -> None:
    static = GuestIdentity(
        hostname="web-1",
        mac="02:00:00:00:00:09",
        network=GuestNetwork(
            enabled=True, mode="static", ip="10.100.0.5", cidr=16, gw="10.100.0.1", dns=("1.1.1.1",)
        ),
    )
    line = identity_request(static, epoch=1700000000, seed=b"\x01\x02")
    assert line == (
        "identity 1700000000 0102 02:00:00:00:00:09 web-1 static 10.100.0.5 16 10.100.0.1 1.1.1.1"
    )
    off = GuestIdentity(hostname="a b;c")
    assert identity_request(off, epoch=1, seed=b"\xff") == "identity 1 ff - abc off"


class _BrokenDriver:
    """A hypervisor whose VMs never start (a broken QEMU, a full disk)."""

    name = "qemu"

    def control_socket(self, spec: VmSpec) -> Path:
        return Path(spec.run_dir) / "ctl.sock"

    async def boot(self, spec: VmSpec, *, vmm_log: Path) -> object:
        raise HypervisorError("qemu-system-x86_64 exited at once: no room")


async def test_a_failed_build_is_logged_and_leaves_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    boot = BootAssets(kernel=kernel, initrd=initrd, accel="tcg")
    manager = TemplateManager(
        tmp_path / "templates",
        cast(Hypervisor, _BrokenDriver()),
        boot,
        budget_bytes=1 << 30,
        vmm_binary=None,
        shapes=(),
    )
    with caplog.at_level(logging.ERROR, logger="worker.templates.manager"):
        assert await manager.ensure(SHAPE) is None
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "failed; cold boots go on: template" in line and "no room" in line
    assert list((tmp_path / "templates").iterdir()) == []
    assert manager.ready_for(SHAPE) is None  # a create boots cold; no retry loop
    assert manager._wanted == []


async def test_the_vmm_of_a_build_cut_short_is_killed_at_start(tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    root = tmp_path / "templates"
    run = root / ".build-0123-1-2" / "run"
    run.mkdir(parents=True)
    # A stand-in for the VMM a killed worker left: its command line names the build's run dir.
    orphan = await anyio.open_process(["sh", "-c", "sleep 60", str(run / "qmp.sock")])
    try:
        boot = BootAssets(kernel=kernel, initrd=initrd, accel="tcg")
        manager = TemplateManager(
            root,
            cast(Hypervisor, _BrokenDriver()),
            boot,
            budget_bytes=1 << 30,
            vmm_binary=None,
        )
        await manager.ensure(SHAPE)
        assert not Path(f"/proc/{orphan.pid}").exists()  # killed and reaped
        assert list(root.iterdir()) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            orphan.kill()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await orphan.aclose()
