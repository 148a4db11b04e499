#!/usr/bin/env bash
# Check vmfleet's Cloud Hypervisor driver against the real cloud-hypervisor, on a KVM host.
#
# vmfleet's own tests drive the driver against an API double (tests/support/ch_double.py):
# the machines it is developed on have no Cloud Hypervisor and no KVM that boots a stock
# kernel. This script is the check against the real thing. From this checkout alone (no
# NATS, no gateway, no bridge) it:
#   1. builds the busybox test image (a shell that prints "tick N" every 0.2 s) and pushes
#      it to a throwaway local registry (docker-registry, on loopback);
#   2. fetches the guest kernel (Debian's cloud kernel) and builds the initrd, as a worker
#      does, into VMFLEET_ASSETS_DIR (default: WORK_DIR/assets);
#   3. makes the worker's own hypervisor choice with VMFLEET_HYPERVISOR=cloud-hypervisor,
#      including its probe boot (the check that KVM really runs guests here);
#   4. drives one instance through the worker's host engine under Cloud Hypervisor:
#      create, standby, restore, a snapshot that keeps it running and a fork of that
#      snapshot (which must count on from the snapshot), hot attach and detach of a
#      volume, stop, delete. The
#      instance has no network (bridge mode needs root and changes the host's network;
#      VMFLEET_NETWORK=bridge is the worker's business, not this check's);
#   5. prints the time each step took, and whether the app went on counting after restore.
#
# Needs:
#   - a host whose KVM runs stock guests (/dev/kvm readable and writable);
#   - cloud-hypervisor (v48 or v49; the static binary from its GitHub releases) on PATH,
#     or VMFLEET_CH_BINARY=/path/to/cloud-hypervisor;
#   - what `make install` sets up, plus the test extras (`.venv/bin/pip install -e '.[test]'`):
#     the image and registry helpers of tests/support are used.
#
# Usage: scripts/check-cloud-hypervisor.sh [WORK_DIR]
#   WORK_DIR defaults to a fresh directory under /tmp, removed afterwards unless KEEP=1.
# Exit status: 0 every check passed; 1 a check failed; 2 this host cannot run the check.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}

cannot() { echo "check-cloud-hypervisor: $*" >&2; exit 2; }

[ -x "$PYTHON" ] || cannot "no $PYTHON: run 'make install' first (or set PYTHON)"
[ -r /dev/kvm ] && [ -w /dev/kvm ] || cannot "/dev/kvm is missing or not usable by $(id -un)"
CH=${VMFLEET_CH_BINARY:-$(command -v cloud-hypervisor || true)}
[ -n "$CH" ] && [ -x "$CH" ] || cannot "no cloud-hypervisor on PATH (or set VMFLEET_CH_BINARY)"
for tool in lz4 skopeo umoci docker-registry mkfs.ext4 busybox; do
	command -v "$tool" >/dev/null || cannot "$tool is missing: run scripts/install.sh"
done

if [ $# -ge 1 ]; then
	WORK=$1
	mkdir -p "$WORK"
else
	WORK=$(mktemp -d /tmp/vmfleet-chcheck.XXXXXX)
	[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
fi
export CHECK_WORK=$WORK CHECK_CH_BINARY=$CH
export CHECK_ASSETS=${VMFLEET_ASSETS_DIR:-$WORK/assets}
echo "cloud-hypervisor: $CH ($("$CH" --version 2>&1 | head -n 1))"
echo "work dir:         $WORK"

"$PYTHON" - <<'EOF'
"""The check itself: the worker's engine with the worker's Cloud Hypervisor choice."""

import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio

from schemas.api import Hypervisor, InstanceState
from schemas.messages import (
    AttachVolume,
    Create,
    CreateSnapshot,
    Delete,
    DetachVolume,
    Restore,
    Standby,
    Stop,
)
from schemas.snapshots import ForkSource, SnapshotKind
from tests.support.images import build_busybox_image, push_image
from tests.support.registry import LocalRegistry
from worker.drivers.select import HypervisorUnavailable, choose_hypervisor
from worker.engine import HostEngine
from worker.guest import ensure_initrd, ensure_kernel
from worker.images import ImageCache
from worker.lifecycle.context import BootAssets, OpContext
from worker.snapshots.capture import snapshot_store
from worker.storage import Storage
from worker.volumes import VolumeStore

TICKER = 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.2; done'
INSTANCE = "chcheck0000000000000001"
failures: list[str] = []


def now() -> datetime:
    return datetime.now(UTC)


def report(step: str, seconds: float, detail: str = "") -> None:
    print(f"{step:<34} {seconds:7.2f} s  {detail}".rstrip(), flush=True)


def check(ok: bool, what: str) -> None:
    print(f"{'ok' if ok else 'FAILED':<6} {what}", flush=True)
    if not ok:
        failures.append(what)


def last_tick(path: Path) -> int:
    """The highest "tick N" the app has printed to ``path`` (0 if none yet)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return 0
    ticks = [int(line.split()[1]) for line in lines if line.startswith("tick ")]
    return max(ticks, default=0)


class CheckFailed(Exception):
    pass


async def wait_until(condition, timeout_s: float, what: str) -> float:
    """Seconds until ``condition()`` held; CheckFailed after ``timeout_s``."""
    started = time.monotonic()
    try:
        with anyio.fail_after(timeout_s):
            while not condition():
                await anyio.sleep(0.01)
    except TimeoutError:
        raise CheckFailed(f"{what} (not within {timeout_s:g} s)") from None
    return time.monotonic() - started


async def timed(engine: HostEngine, command) -> float:
    started = time.monotonic()
    await engine.execute(command)
    return time.monotonic() - started


async def main() -> int:
    work = Path(os.environ["CHECK_WORK"])
    assets = Path(os.environ["CHECK_ASSETS"])
    registry = LocalRegistry(work / "registry")
    registry.start()
    # Short on purpose: the VMM's unix socket paths under it must fit in 107 bytes.
    data = Path(tempfile.mkdtemp(prefix="vc", dir="/tmp"))
    try:
        return await run(work, assets, registry, data)
    finally:
        registry.stop()
        shutil.rmtree(data, ignore_errors=True)


async def run(work: Path, assets: Path, registry: LocalRegistry, data: Path) -> int:
    source = build_busybox_image(work / "oci" / "layout", cmd=("/bin/sh", "-c", TICKER))
    image = push_image(source, registry.address, "busybox:chcheck")
    kernel = await ensure_kernel(assets)
    initrd = await ensure_initrd(assets, kernel)
    print(f"guest kernel:     {kernel.bzimage}\ninitrd:           {initrd}", flush=True)

    # 1. The worker's choice, probe boot included. network_mode="bridge" only because the
    # worker refuses Cloud Hypervisor without it; this check's instance has no network.
    started = time.monotonic()
    try:
        host = await choose_hypervisor(
            "cloud-hypervisor",
            network_mode="bridge",
            ch_binary=Path(os.environ["CHECK_CH_BINARY"]),
            assets_dir=assets,
            kernel=kernel.bzimage,
            initrd=initrd,
        )
    except HypervisorUnavailable as exc:
        print(f"FAILED {exc}", flush=True)
        return 1
    report("probe (or its cached answer)", time.monotonic() - started, host.drivers.name)

    ctx = OpContext(
        host_id="chcheck",
        storage=Storage(data),
        driver=host.drivers,
        images=ImageCache(data / "images"),
        volumes=VolumeStore(data, "chcheck"),
        boot=BootAssets(kernel=kernel.bzimage, initrd=initrd, accel=host.accel),
    )
    engine = HostEngine(ctx)
    await ctx.images.pull(image)  # so that create times the VM, not the pull
    try:
        return await lifecycle(engine, image)
    except CheckFailed as exc:
        print(f"FAILED {exc}; the instance's logs: {engine.instance(INSTANCE).guest.logs}")
        return 1
    finally:
        with anyio.CancelScope(shield=True):
            if INSTANCE in {r.id for r in engine.records()}:
                await engine.execute(Delete(id="del", instance_id=INSTANCE, issued_at=now()))


async def lifecycle(engine: HostEngine, image: str) -> int:
    create = Create(
        id="create",
        instance_id=INSTANCE,
        issued_at=now(),
        name="chcheck",
        image=image,
        size_bytes=256 << 20,
        overlay_bytes=256 << 20,
        vcpus=1,
        network_enabled=False,
        hypervisor=Hypervisor.CLOUD_HYPERVISOR,
    )
    started = time.monotonic()
    await engine.execute(create)
    inst = engine.instance(INSTANCE)
    app_log = inst.guest.app_log
    # 2. Boot: create (overlay, config disk, VMM, vm.create + vm.boot) to the app's output.
    await wait_until(lambda: last_tick(app_log) > 0, 60, "the app printed its first tick")
    report("boot (create -> first app line)", time.monotonic() - started)
    check(inst.spec is not None and inst.spec.hypervisor == "cloud-hypervisor", "runs under CH")
    await wait_until(lambda: last_tick(app_log) >= 5, 30, "the app counted to 5")

    # 3. Standby and restore: the app must go on counting from where it was.
    report("standby", await timed(engine, Standby(id="sb", instance_id=INSTANCE, issued_at=now())))
    before = last_tick(app_log)
    size = sum(p.stat().st_size for p in inst.guest.snapshot.iterdir())
    print(f"{'':<34} snapshot {size >> 20} MiB, app at tick {before}", flush=True)
    check(engine.get(INSTANCE).state is InstanceState.STANDBY, "standby reached Standby")
    restore_s = await timed(engine, Restore(id="rs", instance_id=INSTANCE, issued_at=now()))
    report("restore (includes clock resync)", restore_s)
    # CH truncated app.log on restore; the driver kept the old one as app.log.1.
    await wait_until(lambda: last_tick(app_log) > 0, 30, "the app printed after restore")
    after = last_tick(app_log)
    check(after > before, f"the app went on counting after restore (tick {before} -> {after})")

    # 3b. A snapshot that keeps the VM running, and a fork of it counting on from there.
    await snapshot_and_fork(engine, create)

    # 4. A volume: hot attach (vm.add-disk + mount in the guest) and detach.
    await engine.ctx.volumes.create("vol-chcheck", "chcheck", 1)
    attach = AttachVolume(
        id="at",
        instance_id=INSTANCE,
        issued_at=now(),
        volume_id="vol-chcheck",
        mount_path="/mnt/data",
        readonly=False,
    )
    report("hot attach + mount", await timed(engine, attach))
    detach = DetachVolume(id="dt", instance_id=INSTANCE, issued_at=now(), volume_id="vol-chcheck")
    report("unmount + hot detach", await timed(engine, detach))

    # 5. Stop: the guest's init powers off over the control channel (the virtio console).
    report("stop", await timed(engine, Stop(id="st", instance_id=INSTANCE, issued_at=now())))
    check(engine.get(INSTANCE).state is InstanceState.STOPPED, "stop reached Stopped")
    ops = inst.guest.ops_log.read_text()
    check("killing the VMM" not in ops, "the guest powered off by itself (no SIGKILL)")

    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


FORK = "chcheckfork00000000000001"


async def snapshot_and_fork(engine: HostEngine, create: Create) -> None:
    app_log = engine.instance(INSTANCE).guest.app_log
    snapshot = CreateSnapshot(
        id="snap",
        instance_id=INSTANCE,
        issued_at=now(),
        snapshot_id="chcheck-snap",
        kind=SnapshotKind.STANDBY,
    )
    report("snapshot (VM kept running)", await timed(engine, snapshot))
    check(engine.get(INSTANCE).state is InstanceState.RUNNING, "the source kept running")
    at_snapshot = last_tick(app_log)
    fork = Create(
        **{f: getattr(create, f) for f in create.__struct_fields__ if f not in ("fork",)}
        | {"id": "fork", "instance_id": FORK, "name": "chcheck-fork"},
        fork=ForkSource(snapshot_id="chcheck-snap"),
    )
    try:
        report("fork -> Running", await timed(engine, fork))
        fork_log = engine.instance(FORK).guest.app_log
        await wait_until(lambda: last_tick(fork_log) > 0, 30, "the fork printed")
        first = last_tick(fork_log)
        check(first >= at_snapshot - 1, f"the fork counts on from the snapshot ({first})")
    finally:
        with anyio.CancelScope(shield=True):
            if FORK in {r.id for r in engine.records()}:
                await engine.execute(Delete(id="del-fork", instance_id=FORK, issued_at=now()))
            snapshot_store(engine.ctx).remove("chcheck-snap")


sys.exit(anyio.run(main))
EOF
