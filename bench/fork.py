"""Fork on one host: a 256 MiB guest forked to Running next to a restore of the same
snapshot, and the disk ten forks take next to one.

One parent (a busybox counter) is snapshotted while it runs (kind Standby; the pause is
read from its ops log). Then, alternately for ``--runs`` rounds: a fork of the snapshot is
made and timed from the command to Running (its guest has taken its new identity), and
deleted; the parent is restored in place from the same snapshot, timed the same way. Both
go through ``worker.resume``; a fork also makes its copy-on-write layers and its network.
Goal (issue 18): a same-host fork within 1.5x the restore.

Then ``--forks`` forks are made at once from the snapshot, and the disk the snapshot and
its forks take (``du``, each hard-linked file counted once) is compared with the snapshot
and one fork. Goal: ten forks use less than 2x one fork's disk.

The cross-host part (a fork onto a second host, transfer included, next to the restore and
the same bytes through a plain Object Store put and get) is ``bench/transfer.py``'s
``cross_host_fork``. Goal: within the restore plus that bare transfer plus 20 %.
Runs the worker's engine in-process on QEMU (TCG here), no NATS.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support import Summary
from bench.transfer import cross_host_fork
from schemas.clock import utc_now
from schemas.messages import Create, CreateSnapshot, Delete, RestoreSnapshot
from schemas.snapshots import ForkSource, SnapshotKind
from tests.support.images import build_busybox_image, push_image
from tests.support.registry import LocalRegistry
from worker.accel import choose_accel
from worker.drivers.qemu import QemuDriver
from worker.engine import HostEngine
from worker.guest import DEFAULT_AGENT, ensure_initrd, ensure_kernel
from worker.images import ImageCache
from worker.lifecycle.context import BootAssets, OpContext
from worker.snapshots.capture import snapshot_store
from worker.storage import Storage
from worker.volumes import VolumeStore

MIB = 1 << 20
COUNTER = 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.3; done'


def create(image: str, instance_id: str, name: str, fork: str | None = None) -> Create:
    return Create(
        id=f"c-{instance_id}",
        instance_id=instance_id,
        issued_at=utc_now(),
        name=name,
        image=image,
        size_bytes=256 * MIB,
        overlay_bytes=1024 * MIB,
        vcpus=1,
        cmd=["/bin/sh", "-c", COUNTER],
        fork=ForkSource(snapshot_id=fork) if fork else None,
    )


async def timed(engine: HostEngine, command: object) -> float:
    started = time.monotonic()
    await engine.execute(command)  # type: ignore[arg-type]
    return time.monotonic() - started


async def wait_for_text(path: Path, text: str, timeout_s: float = 120) -> None:
    with anyio.fail_after(timeout_s):
        while text not in (path.read_text(errors="replace") if path.exists() else ""):
            await anyio.sleep(0.1)


def du_bytes(*paths: Path) -> int:
    """Disk taken by ``paths`` together, each hard-linked file once (du's rule)."""
    out = subprocess.run(
        ["du", "-s", "-c", "-B1", *map(str, paths)], capture_output=True, text=True, check=True
    ).stdout
    return int(out.strip().splitlines()[-1].split()[0])


async def same_host(
    engine: HostEngine, image: str, runs: int, forks: int, summary: Summary
) -> None:
    parent = create(image, "benchparent0000000000001", "parent")
    await engine.execute(parent)
    app_log = engine.instance(parent.instance_id).guest.app_log
    await wait_for_text(app_log, "tick 3\n")
    snap = CreateSnapshot(
        id="snap",
        issued_at=utc_now(),
        instance_id=parent.instance_id,
        snapshot_id="bench-snap",
        kind=SnapshotKind.STANDBY,
    )
    snapshot_s = await timed(engine, snap)
    ops = engine.instance(parent.instance_id).guest.ops_log.read_text()
    pause_ms = int(ops.rsplit("save_ms=", 1)[1].split()[0])
    store = snapshot_store(engine.ctx)

    fork_s, restore_s = [], []
    for n in range(runs):
        fork_id = f"benchfork{n:015d}"
        fork_s.append(await timed(engine, create(image, fork_id, f"fork-{n}", "bench-snap")))
        await engine.execute(Delete(id=f"d-{fork_id}", instance_id=fork_id, issued_at=utc_now()))
        restore = RestoreSnapshot(
            id=f"r-{n}",
            issued_at=utc_now(),
            instance_id=parent.instance_id,
            snapshot_id="bench-snap",
        )
        restore_s.append(await timed(engine, restore))
    fork_med, restore_med = statistics.median(fork_s), statistics.median(restore_s)
    print(f"snapshot of the running parent: {snapshot_s:.2f} s (paused {pause_ms} ms)")
    print(f"fork -> Running   median {fork_med:.3f} s  {[round(s, 3) for s in fork_s]}")
    print(f"restore (in place) median {restore_med:.3f} s  {[round(s, 3) for s in restore_s]}")
    summary.add("snapshot of a running 256 MiB guest", round(snapshot_s, 3), unit="s")
    summary.add("pause during that snapshot", pause_ms, unit="ms")
    summary.add(
        f"same-host fork -> Running (median of {runs})",
        round(fork_med, 3),
        unit="s",
        baseline=round(restore_med, 3),
        baseline_name="restore of the same snapshot, in place",
        ratio=round(fork_med / restore_med, 3),
        goal="< 1.5x",
        met=fork_med / restore_med < 1.5,
        issue="18",
    )

    # One fork's disk, then `forks` forks at once.
    snapshot_dir = store.directory("bench-snap")
    guests = engine.ctx.storage
    one = "benchone0000000000000001"
    await engine.execute(create(image, one, "one", "bench-snap"))
    one_bytes = du_bytes(snapshot_dir, guests.guest(one).root)
    await engine.execute(Delete(id="d-one", instance_id=one, issued_at=utc_now()))
    ids = [f"benchmany{n:015d}" for n in range(forks)]
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for n, fork_id in enumerate(ids):
            tg.start_soon(engine.execute, create(image, fork_id, f"many-{n}", "bench-snap"))
    many_s = time.monotonic() - started
    many_bytes = du_bytes(snapshot_dir, *(guests.guest(i).root for i in ids))
    print(f"{forks} forks at once: {many_s:.2f} s to all Running")
    print(
        f"disk: snapshot + 1 fork {one_bytes / MIB:.1f} MiB, snapshot + {forks} forks "
        f"{many_bytes / MIB:.1f} MiB ({many_bytes / one_bytes:.2f}x)"
    )
    summary.add(f"{forks} concurrent forks -> all Running", round(many_s, 2), unit="s")
    summary.add(
        f"disk of the snapshot + {forks} forks",
        round(many_bytes / MIB, 1),
        unit="MiB",
        baseline=round(one_bytes / MIB, 1),
        baseline_name="the snapshot + one fork",
        ratio=round(many_bytes / one_bytes, 3),
        goal="< 2x",
        met=many_bytes / one_bytes < 2,
        issue="18",
    )
    async with anyio.create_task_group() as tg:
        for fork_id in [*ids, parent.instance_id]:
            tg.start_soon(
                engine.execute, Delete(id=f"d-{fork_id}", instance_id=fork_id, issued_at=utc_now())
            )


async def main(runs: int, forks: int, as_json: bool) -> None:
    assets = Path(__file__).resolve().parents[1] / ".cache" / "test-assets"
    work = Path(tempfile.mkdtemp(prefix="vk", dir="/tmp"))
    registry = LocalRegistry(work / "registry")
    registry.start()
    try:
        kernel = await ensure_kernel(assets)
        initrd = await ensure_initrd(assets, kernel)
        accel = await choose_accel(
            assets,
            qemu=shutil.which("qemu-system-x86_64") or "",
            kernel=kernel.bzimage,
            initrd=initrd,
        )
        image = push_image(build_busybox_image(work / "layout"), registry.address, "bench:latest")
        ctx = OpContext(
            host_id="bench",
            storage=Storage(work / "data"),
            driver=QemuDriver(),
            images=ImageCache(work / "data" / "images"),
            volumes=VolumeStore(work / "data", "bench"),
            boot=BootAssets(kernel=kernel.bzimage, initrd=initrd, accel=accel, agent=DEFAULT_AGENT),
        )
        engine = HostEngine(ctx)
        await ctx.images.pull(image)
        summary = Summary("fork", {"runs": runs, "forks": forks, "accel": accel})
        try:
            await same_host(engine, image, runs, forks, summary)
            await cross_host_fork(engine, image, "bench-snap", work, summary)
        finally:
            with anyio.CancelScope(shield=True):
                for record in list(engine.records()):
                    await engine.execute(
                        Delete(id=f"x-{record.id}", instance_id=record.id, issued_at=utc_now())
                    )
        if as_json:
            summary.emit()
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--forks", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="also print a JSON summary line")
    args = parser.parse_args()
    anyio.run(main, args.runs, args.forks, args.json)
