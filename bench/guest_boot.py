"""Guest boot, standby and restore: vmfleet's engine next to raw QEMU, in one run.

vmfleet: HostEngine.execute(Create) until the app's first line is in app.log; Standby;
Restore until the guest answers again. Raw: the same kernel, initrd and disks booted by a
plain `qemu-system-x86_64` command line (no vmfleet code in the loop), the app's first line
read from its console file; raw standby/restore are QMP stop+migrate / -incoming+cont
issued directly. Prints medians and ratios, and the steps of vmfleet's create (as its ops
log line and ``vmfleet_worker_create_phase_seconds`` report them; this engine has no agent
hub, so the guest's part is split at the init's logged uptime: kernel to init, then init
to the app's first line). Goal ([2/9]): overhead under 10% of the raw
boot; restore under 1.5x the raw restore.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support import Summary
from schemas.api import Hypervisor
from schemas.clock import utc_now
from schemas.messages import Create, Delete, Restore, Standby
from tests.support.images import build_busybox_image
from worker.accel import choose_accel
from worker.drivers.qemu import QemuDriver, build_args
from worker.engine import HostEngine
from worker.guest import ensure_initrd, ensure_kernel
from worker.images import ImageCache
from worker.lifecycle.context import BootAssets, OpContext
from worker.lifecycle.phases import init_uptime_s
from worker.storage import Storage
from worker.volumes import VolumeStore

MIB = 1 << 20
#: The steps of a boot as printed: the create's on the host, then the guest's.
_STEPS = ("pull", "disks", "vmm", "boot", "app")
APP = "echo first-line; i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done"


async def wait_for(path: Path, text: str, after: int = 0, timeout: float = 120) -> float:
    with anyio.fail_after(timeout):
        while True:
            if path.exists() and text.encode() in path.read_bytes()[after:]:
                return time.perf_counter()
            await anyio.sleep(0.005)


class Qmp:
    """Raw QMP, blocking, for the baseline: no vmfleet code."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        for _ in range(400):
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                time.sleep(0.005)
        self.file = self.sock.makefile("rwb")
        self.file.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: object) -> dict[str, object]:
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "return" in reply or "error" in reply:
                return reply  # type: ignore[no-any-return]

    def close(self) -> None:
        self.sock.close()


#: The steps of the last create, as the engine reported them (OpContext.observe_create_phase).
create_steps: dict[str, float] = {}


def guest_steps(app_log: Path, create_s: float, boot_s: float) -> dict[str, float]:
    """The guest's part of a boot with no agent to wait for: kernel to init (the uptime the
    init logs) and init to the app's first line (the rest of the boot after the create)."""
    kernel = init_uptime_s(app_log) or 0.0
    return {"boot": kernel, "app": max(boot_s - create_s - kernel, 0.0)}


async def vmfleet_round(
    engine: HostEngine, image: str, n: int
) -> tuple[tuple[float, float, float], dict[str, float]]:
    iid = f"bench{n:04d}"
    create = Create(
        id=f"c{iid}",
        instance_id=iid,
        issued_at=utc_now(),
        name=iid,
        image=image,
        size_bytes=256 * MIB,
        overlay_bytes=256 * MIB,
        vcpus=1,
        hypervisor=Hypervisor.QEMU,
        cmd=["/bin/sh", "-c", APP],
    )
    create_steps.clear()
    start = time.perf_counter()
    await engine.execute(create)
    created = time.perf_counter() - start
    app_log = engine.instance(iid).guest.app_log
    boot = await wait_for(app_log, "first-line") - start
    steps = {k: v for k, v in create_steps.items() if k in ("pull", "disks", "vmm")}
    steps.update(guest_steps(app_log, created, boot))
    await wait_for(app_log, "tick 2")
    start = time.perf_counter()
    await engine.execute(Standby(id=f"s{iid}", instance_id=iid, issued_at=utc_now()))
    standby = time.perf_counter() - start
    size = app_log.stat().st_size
    start = time.perf_counter()
    await engine.execute(Restore(id=f"r{iid}", instance_id=iid, issued_at=utc_now()))
    await wait_for(app_log, "tick", after=size)
    restore = time.perf_counter() - start
    await engine.execute(Delete(id=f"d{iid}", instance_id=iid, issued_at=utc_now()))
    return (boot, standby, restore), steps


async def raw_round(
    engine: HostEngine, image_disk: str, workdir: Path
) -> tuple[float, float, float]:
    """The same VM without vmfleet: one instance's spec, copied, run by hand."""
    probe = workdir / "raw"
    shutil.rmtree(probe, ignore_errors=True)
    probe.mkdir()
    # Borrow a config disk and overlay the engine made, so the guest does the same work.
    iid = "rawsrc"
    await engine.execute(
        Create(
            id="craw",
            instance_id=iid,
            issued_at=utc_now(),
            name=iid,
            image=image_disk,
            size_bytes=256 * MIB,
            overlay_bytes=256 * MIB,
            vcpus=1,
            hypervisor=Hypervisor.QEMU,
            cmd=["/bin/sh", "-c", APP],
        )
    )
    inst = engine.instance(iid)
    spec = inst.spec
    assert spec is not None and inst.process is not None
    await inst.process.kill_and_reap()
    inst.process = None
    for disk in spec.disks:
        if disk.id != "root":
            shutil.copy(disk.path, probe / Path(disk.path).name)
    disks = tuple(
        d
        if d.id == "root"
        else type(d)(
            id=d.id, path=str(probe / Path(d.path).name), readonly=d.readonly, serial=d.serial
        )
        for d in spec.disks
    )
    import msgspec

    raw_spec = msgspec.structs.replace(
        spec, disks=disks, serial_log=str(probe / "console.log"), run_dir=str(probe)
    )
    argv = build_args(raw_spec, binary=shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        boot = await wait_for(probe / "console.log", "first-line") - start
        await wait_for(probe / "console.log", "tick 2")
        qmp = Qmp(probe / "qmp.sock")
        start = time.perf_counter()
        qmp.cmd("stop")
        qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        qmp.cmd("migrate", uri=f"exec:cat > {probe / 'memory'}")
        while qmp.cmd("query-migrate").get("return", {}).get("status") != "completed":  # type: ignore[union-attr]
            time.sleep(0.005)
        qmp.cmd("quit")
        qmp.close()
        proc.wait()
        standby = time.perf_counter() - start
        size = (probe / "console.log").stat().st_size
        start = time.perf_counter()
        proc = subprocess.Popen(
            [*argv, "-incoming", "defer"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        qmp = Qmp(probe / "qmp.sock")
        qmp.cmd("migrate-incoming", uri=f"exec:cat {probe / 'memory'}")
        while qmp.cmd("query-status").get("return", {}).get("status") not in (
            "paused",
            "postmigrate",
            "running",
        ):  # type: ignore[union-attr]
            time.sleep(0.005)
        qmp.cmd("cont")
        await wait_for(probe / "console.log", "tick", after=size)
        restore = time.perf_counter() - start
        qmp.close()
    finally:
        proc.kill()
        proc.wait()
        await engine.execute(Delete(id="draw", instance_id=iid, issued_at=utc_now()))
    return boot, standby, restore


async def main(runs: int, as_json: bool = False) -> None:
    assets = Path(__file__).resolve().parents[1] / ".cache" / "test-assets"
    work = Path(tempfile.mkdtemp(prefix="vb", dir="/tmp"))
    registry = None
    try:
        kernel = await ensure_kernel(assets)
        initrd = await ensure_initrd(assets, kernel)
        accel = await choose_accel(
            assets,
            qemu=shutil.which("qemu-system-x86_64") or "",
            kernel=kernel.bzimage,
            initrd=initrd,
        )
        from tests.support.images import push_image
        from tests.support.registry import LocalRegistry

        registry = LocalRegistry(work / "registry")
        registry.start()
        image = push_image(build_busybox_image(work / "layout"), registry.address, "bench:latest")
        ctx = OpContext(
            host_id="bench",
            storage=Storage(work / "data"),
            driver=QemuDriver(),
            images=ImageCache(work / "data" / "images"),
            volumes=VolumeStore(work / "data", "bench"),
            boot=BootAssets(kernel=kernel.bzimage, initrd=initrd, accel=accel),
            observe_create_phase=create_steps.__setitem__,
        )
        engine = HostEngine(ctx)
        await ctx.images.pull(image)  # the cache is warm in both cases
        results: dict[str, list[tuple[float, float, float]]] = {"vmfleet": [], "raw": []}
        steps: list[dict[str, float]] = []
        for n in range(runs):
            results["raw"].append(await raw_round(engine, image, work))
            timings, round_steps = await vmfleet_round(engine, image, n)
            results["vmfleet"].append(timings)
            steps.append(round_steps)
        med = {
            k: [statistics.median(r[i] for r in v) for i in range(3)] for k, v in results.items()
        }
        print(f"accelerator: {accel}, runs: {runs} (medians, seconds)")
        print(f"{'':10}{'vmfleet':>10}{'raw qemu':>10}{'ratio':>8}  goal")
        goals = ["overhead < 10%", "", "< 1.5x"]
        limits = [1.10, None, 1.5]
        summary = Summary("guest_boot", {"runs": runs, "accel": accel})
        for i, label in enumerate(["boot", "standby", "restore"]):
            v, r = med["vmfleet"][i], med["raw"][i]
            print(f"{label:10}{v:10.3f}{r:10.3f}{v / r:8.2f}  {goals[i]}")
            limit = limits[i]
            summary.add(
                f"{label} (median of {runs})",
                round(v, 3),
                unit="s",
                baseline=round(r, 3),
                baseline_name="raw qemu-system-x86_64 over QMP",
                ratio=round(v / r, 3),
                goal=goals[i],
                met=None if limit is None else v / r < limit,
                issue="2/9",
            )
        step_medians = {k: statistics.median(s.get(k, 0.0) for s in steps) for k in _STEPS if steps}
        print(
            "vmfleet boot by step (medians, ms): "
            + " ".join(f"{k}={v * 1000:.0f}" for k, v in step_medians.items())
            + f"  | raw qemu boot {med['raw'][0] * 1000:.0f}"
        )
        for k, v in step_medians.items():
            summary.add(f"boot step {k} (median of {runs})", round(v, 3), unit="s", issue="3/6")
        if as_json:
            summary.emit()
    finally:
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="also print a JSON summary line")
    args = parser.parse_args()
    anyio.run(main, args.runs, args.json)
