"""Snapshots on one host without booting a guest: copy-on-write layers read by a real QEMU,
forks refused before anything is made (a snapshot from another VMM, one with volumes, one
that is not there), a full disk during a snapshot's copy, and a schedule's retention."""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from schemas.api import InstanceState
from schemas.errors import Conflict, InsufficientStorage, NotFound, VmfleetError
from schemas.messages import Create, CreateSnapshot
from schemas.snapshots import (
    FileIdentity,
    ForkSource,
    ScheduleState,
    SnapshotDisk,
    SnapshotKind,
    SnapshotManifest,
    SnapshotSource,
)
from tests.worker.conftest import create_command
from worker.drivers.base import DiskSpec, VmSpec
from worker.drivers.qemu import qemu_binary
from worker.engine import HostEngine
from worker.host import HostLimits
from worker.snapshots.capture import snapshot_store
from worker.snapshots.identity import vmm_version
from worker.snapshots.layers import chain, link_chain, new_top_layer
from worker.snapshots.schedule import expired_snapshots
from worker.snapshots.store import SnapshotStore, copy_cow, sha256_file

MIB = 1 << 20
T0 = datetime(2026, 12, 5, tzinfo=UTC)


# -- copy-on-write layers ----------------------------------------------------------------------


def qemu_io(image: Path, *commands: str) -> str:
    """Run qemu-io commands on a qcow2 image in a QEMU without a machine; what it says."""
    lines = [json.dumps({"execute": "qmp_capabilities"})]
    for command in commands:
        line = f'qemu-io disk "{command}"'
        arguments = {"command-line": line}
        lines.append(json.dumps({"execute": "human-monitor-command", "arguments": arguments}))
    lines.append(json.dumps({"execute": "quit"}))
    done = subprocess.run(
        [
            qemu_binary(),
            *("-machine", "none", "-nodefaults", "-nographic", "-qmp", "stdio"),
            "-blockdev",
            f"driver=qcow2,node-name=disk,file.driver=file,file.filename={image}",
        ],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_a_layer_reads_its_base_and_keeps_its_writes(tmp_path: Path) -> None:
    base = tmp_path / "snap" / "overlay.raw"
    base.parent.mkdir()
    with open(base, "wb") as out:
        out.truncate(64 * MIB)
        out.seek(10 * MIB)
        out.write(b"\xab" * 4096)
    before = sha256_file(base)
    linked = link_chain(base, tmp_path / "guest" / "disks" / "snap")
    layer = new_top_layer(tmp_path / "guest" / "disks", "overlay", "i1", linked)

    said = qemu_io(
        layer,
        f"read -P 0xab {10 * MIB} 4k",
        f"write -P 0xcd {20 * MIB} 64k",
        f"read -P 0xcd {20 * MIB} 64k",
    )
    assert "Pattern verification failed" not in said, said
    assert said.count("read ") == 2 and "wrote 65536/65536" in said, said
    assert sha256_file(base) == before  # the snapshot's file was never written
    assert [p.name for p in chain(layer)] == [layer.name, "overlay.raw"]
    assert layer.stat().st_blocks * 512 < 2 * MIB  # the write, not a copy of the base


def test_two_snapshots_files_of_one_name_never_meet(tmp_path: Path) -> None:
    """A restore from one snapshot, then from another: each layer reads its own snapshot's
    disk, though both files are called overlay.raw."""
    disks = tmp_path / "guest" / "disks"
    layers = []
    for name, content in (("s1", b"one"), ("s2", b"two")):
        base = tmp_path / name / "disks" / "overlay.raw"
        base.parent.mkdir(parents=True)
        base.write_bytes(content.ljust(4096, b"\0"))
        layers.append(new_top_layer(disks, "overlay", "i1", link_chain(base, disks / name)))
    for layer, name in zip(layers, ("s1", "s2"), strict=True):
        below = list(chain(layer))[1]
        assert below.samefile(tmp_path / name / "disks" / "overlay.raw")
    assert layers[0].name != layers[1].name


def test_a_snapshot_fetched_from_another_host_is_unlinked_not_its_cached_copy(
    tmp_path: Path,
) -> None:
    """Another host's snapshot is a link into the transfers cache: deleting the snapshot,
    or sweeping a link whose copy the cache evicted, removes the link and nothing else."""
    store = SnapshotStore(tmp_path)
    store.root.mkdir()
    cached = tmp_path / "transfers" / "s1"
    cached.mkdir(parents=True)
    (cached / "manifest.json").write_text("{}")
    store.directory("s1").symlink_to(cached)
    evicted = store.directory("s2")
    evicted.symlink_to(tmp_path / "transfers" / "gone")
    store.remove("s1")
    store.sweep_incomplete()
    assert list(store.root.iterdir()) == []
    assert (cached / "manifest.json").exists()


# -- forks refused before anything is made -----------------------------------------------------


@pytest.fixture
def host(data_dir: Path, boot_assets: object) -> Iterator[HostEngine]:
    from tests.worker.conftest import make_context

    yield HostEngine(make_context(data_dir, boot_assets))  # type: ignore[arg-type]


SPEC_FIELDS: dict[str, object] = {
    "instance_id": "source",
    "vcpus": 1,
    "memory_bytes": 256 * MIB,
    "kernel": "/k",
    "initrd": "/i",
    "cmdline": "",
    "serial_log": "/x/app.log",
    "run_dir": "/x/run",
    "disks": (),
}


def put_snapshot(
    engine: HostEngine, snapshot_id: str, *, vmm_version: str, volume_ids: list[str]
) -> SnapshotManifest:
    """A snapshot's files and manifest as a capture writes them (its memory is made up)."""
    store = snapshot_store(engine.ctx)
    partial = store.begin(snapshot_id)
    (partial / "vm").mkdir()
    (partial / "vm" / "memory").write_bytes(b"not a VM")
    (partial / "disks" / "overlay.raw").write_bytes(b"")
    boot = engine.ctx.boot
    spec = VmSpec(
        instance_id="source",
        vcpus=1,
        memory_bytes=256 * MIB,
        kernel=str(boot.kernel),
        initrd=str(boot.initrd),
        cmdline="console=ttyS0",
        disks=(DiskSpec(id="overlay", path="/x/overlay.raw", readonly=False, serial="o"),),
        serial_log="/x/app.log",
        run_dir="/x/run",
    )
    (partial / "vm" / "vm.json").write_bytes(msgspec.json.encode(spec))
    manifest = SnapshotManifest(
        id=snapshot_id,
        kind=SnapshotKind.STANDBY,
        created_at=T0,
        host="test-host",
        source=SnapshotSource(
            id="source",
            name="source",
            image="busybox",
            image_digest="sha256:" + "0" * 64,
            size_bytes=256 * MIB,
            overlay_bytes=256 * MIB,
            vcpus=1,
            state=InstanceState.RUNNING,
            volume_ids=volume_ids,
        ),
        hypervisor="qemu",
        vmm_version=vmm_version,
        kernel=FileIdentity(path=str(boot.kernel), sha256="sparse-sha256:whatever"),
        initrd=FileIdentity(path=str(boot.initrd), sha256="sparse-sha256:whatever"),
        memory_bytes=256 * MIB,
        vcpus=1,
        disks=(SnapshotDisk(id="overlay", serial="o", readonly=False, file="disks/overlay.raw"),),
    )
    store.complete(partial, manifest)
    return manifest


def fork_of(snapshot_id: str, name: str = "fork") -> Create:
    cmd = create_command("busybox", name=name)
    return msgspec.structs.replace(cmd, fork=ForkSource(snapshot_id=snapshot_id))


def assert_nothing_made(engine: HostEngine, cmd: Create) -> None:
    assert list(engine.records()) == []
    assert not engine.ctx.storage.guest(cmd.instance_id).root.exists()


@pytest.mark.anyio
async def test_fork_under_another_vmm_version_is_refused(host: HostEngine) -> None:
    put_snapshot(host, "s-old", vmm_version="QEMU emulator version 6.0.0", volume_ids=[])
    cmd = fork_of("s-old")
    with pytest.raises(Conflict) as refused:
        await host.execute(cmd)
    assert refused.value.code == "snapshot_incompatible"
    assert "6.0.0" in str(refused.value)
    assert_nothing_made(host, cmd)
    assert snapshot_store(host.ctx).read("s-old") is not None  # the snapshot is untouched


@pytest.mark.anyio
async def test_fork_under_another_kernel_is_refused(host: HostEngine) -> None:
    version = await vmm_version(host.ctx.driver, VmSpec(**{**SPEC_FIELDS, "hypervisor": "qemu"}))
    put_snapshot(host, "s-kernel", vmm_version=version, volume_ids=[])  # kernel sha differs
    cmd = fork_of("s-kernel")
    with pytest.raises(Conflict, match="kernel") as refused:
        await host.execute(cmd)
    assert refused.value.code == "snapshot_incompatible"
    assert_nothing_made(host, cmd)


@pytest.mark.anyio
async def test_fork_of_a_snapshot_with_volumes_is_refused(host: HostEngine) -> None:
    put_snapshot(host, "s-vol", vmm_version="any", volume_ids=["vol-1"])
    cmd = fork_of("s-vol")
    with pytest.raises(Conflict) as refused:
        await host.execute(cmd)
    assert refused.value.code == "not_supported"
    assert_nothing_made(host, cmd)


@pytest.mark.anyio
async def test_fork_onto_a_host_without_room_is_host_full(host: HostEngine) -> None:
    put_snapshot(host, "s-big", vmm_version="any", volume_ids=[])
    host.ctx.limits = HostLimits(vcpus=0.5, memory_bytes=64 * MIB)
    cmd = fork_of("s-big")
    with pytest.raises(VmfleetError) as refused:
        await host.execute(cmd)
    assert (refused.value.code, refused.value.status) == ("host_full", 503)
    assert_nothing_made(host, cmd)


@pytest.mark.anyio
async def test_fork_of_a_missing_snapshot_is_404(host: HostEngine) -> None:
    cmd = fork_of("nowhere")
    with pytest.raises(NotFound):
        await host.execute(cmd)
    assert_nothing_made(host, cmd)


def test_incomplete_snapshots_are_swept(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    store.begin("half")
    (store.root / "no-manifest").mkdir()
    store.sweep_incomplete()
    assert list(store.root.iterdir()) == []
    store.remove("never-there")  # deleting what is gone is not an error


# -- a full disk --------------------------------------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Path]:
    mount = Path(tempfile.mkdtemp(prefix="vf-full"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        mount.rmdir()


@pytest.mark.anyio
async def test_a_copy_onto_a_full_disk_is_507_and_leaves_nothing(
    tmp_path: Path, small_disk: Path
) -> None:
    source = tmp_path / "overlay.raw"
    source.write_bytes(b"\x01" * (4 * MIB))
    with pytest.raises(InsufficientStorage):
        await copy_cow(source, small_disk / "overlay.raw")
    assert list(small_disk.iterdir()) == []


@pytest.mark.anyio
async def test_a_snapshot_the_disk_cannot_hold_is_507_before_anything(
    tmp_path: Path, small_disk: Path, boot_assets: object
) -> None:
    from tests.support.gateway import instance_record
    from tests.worker.conftest import make_context
    from worker.lifecycle.context import LocalInstance
    from worker.snapshots.capture import create_snapshot

    ctx = make_context(small_disk, boot_assets)  # type: ignore[arg-type]
    overlay = tmp_path / "overlay.raw"  # written blocks: more than the small disk holds
    overlay.write_bytes(b"\x01" * (4 * MIB))
    guest = ctx.storage.create_guest("i-full")
    spec = VmSpec(
        instance_id="i-full",
        vcpus=1,
        memory_bytes=256 * MIB,
        kernel="/k",
        initrd="/i",
        cmdline="",
        disks=(DiskSpec(id="overlay", path=str(overlay), readonly=False, serial="o"),),
        serial_log=str(guest.app_log),
        run_dir=str(guest.run_dir),
    )
    guest.write(guest.vm_spec, spec)
    inst = LocalInstance(
        record=instance_record("i-full", "full", "test-host", state=InstanceState.STOPPED),
        guest=guest,
    )
    cmd = CreateSnapshot(
        id="c", issued_at=T0, instance_id="i-full", snapshot_id="s", kind=SnapshotKind.STOPPED
    )
    with pytest.raises(InsufficientStorage, match="MiB free"):
        await create_snapshot(ctx, inst, cmd)
    assert list(snapshot_store(ctx).root.iterdir()) == []


@pytest.mark.anyio
async def test_a_save_the_disk_fills_up_under_is_507_and_leaves_nothing(
    tmp_path: Path, small_disk: Path, boot_assets: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The room check passed, then the disk filled while the VMM wrote the memory: QEMU
    reports a broken pipe, the user gets a full disk (507), and no partial snapshot stays."""
    from schemas.errors import HypervisorError
    from tests.support.gateway import instance_record
    from tests.worker.conftest import make_context
    from worker.lifecycle.context import LocalInstance
    from worker.snapshots.capture import create_snapshot

    ctx = make_context(small_disk, boot_assets)  # type: ignore[arg-type]
    guest = ctx.storage.create_guest("i-fill")
    spec = VmSpec(
        instance_id="i-fill",
        vcpus=1,
        memory_bytes=MIB,
        kernel="/k",
        initrd="/i",
        cmdline="",
        disks=(),
        serial_log=str(guest.app_log),
        run_dir=str(guest.run_dir),
    )

    async def save_filling_the_disk(spec: VmSpec, process: object, vm: Path, *_: object) -> None:
        with contextlib.suppress(OSError), (vm / "memory").open("wb") as memory:
            while True:
                memory.write(b"\x01" * MIB)
        raise HypervisorError("snapshot failed: Unable to write to command: Broken pipe")

    monkeypatch.setattr(ctx.driver, "save_live", save_filling_the_disk)
    inst = LocalInstance(
        record=instance_record("i-fill", "fill", "test-host", state=InstanceState.RUNNING),
        guest=guest,
    )
    inst.spec, inst.process = spec, object()  # type: ignore[assignment]
    cmd = CreateSnapshot(
        id="c", issued_at=T0, instance_id="i-fill", snapshot_id="s", kind=SnapshotKind.STANDBY
    )
    with pytest.raises(InsufficientStorage, match="disk is full"):
        await create_snapshot(ctx, inst, cmd)
    assert list(snapshot_store(ctx).root.iterdir()) == []


# -- retention --------------------------------------------------------------------------------


def manifest_at(snapshot_id: str, minutes_ago: int, *, scheduled: bool = True) -> SnapshotManifest:
    return msgspec.structs.replace(
        SnapshotManifest(
            id=snapshot_id,
            kind=SnapshotKind.STANDBY,
            created_at=T0,
            host="h",
            scheduled=scheduled,
            source=SnapshotSource(
                id="i",
                name="i",
                image="x",
                image_digest="",
                size_bytes=1,
                overlay_bytes=1,
                vcpus=1,
                state=InstanceState.RUNNING,
            ),
            hypervisor="qemu",
            vmm_version="v",
            kernel=FileIdentity(path="k", sha256="s"),
            initrd=FileIdentity(path="i", sha256="s"),
            memory_bytes=1,
            vcpus=1,
        ),
        created_at=T0 - timedelta(minutes=minutes_ago),
    )


def schedule(max_count: int = 0, max_age_s: float | None = None) -> ScheduleState:
    return ScheduleState(
        interval_s=60,
        max_count=max_count,
        max_age_s=max_age_s,
        created_at=T0,
        updated_at=T0,
        next_run_at=T0,
    )


def test_retention_keeps_the_newest_and_never_a_manual_snapshot() -> None:
    owned = [manifest_at(f"s{m}", m) for m in (1, 2, 3, 4, 5)] + [
        manifest_at("manual", 10, scheduled=False)
    ]
    assert [m.id for m in expired_snapshots(owned, schedule(max_count=3), T0)] == ["s4", "s5"]
    by_age = expired_snapshots(owned, schedule(max_age_s=150), T0)
    assert [m.id for m in by_age] == ["s3", "s4", "s5"]
    both = expired_snapshots(owned, schedule(max_count=4, max_age_s=150), T0)
    assert sorted(m.id for m in both) == ["s3", "s4", "s5"]
