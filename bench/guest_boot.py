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

The trivial baseline ([5/6]) is plain QEMU booting the kernel as Debian ships it (the
bzImage) into a busybox init that prints one line, on the same command line otherwise.
vmfleet boots the PVH vmlinux inside that bzImage (worker.guest.vmlinux.boot_kernel), so
the trivial init is also timed from that file, to tell the boot path's gain from the
init's cost.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support import RawQmp, Summary, dev_stack, settle
from cli.embedded_nats import free_port
from schemas.api import Hypervisor
from schemas.clock import utc_now
from schemas.messages import Create, Delete, Restore, Standby
from tests.support.images import build_busybox_image
from worker.accel import choose_accel
from worker.drivers.qemu import QemuDriver, build_args
from worker.engine import HostEngine
from worker.guest import DEFAULT_AGENT, boot_kernel, ensure_initrd, ensure_kernel
from worker.guest.initrd import DEFAULT_BUSYBOX, _Entry, _write_cpio
from worker.images import ImageCache
from worker.lifecycle.context import BootAssets, OpContext
from worker.lifecycle.phases import init_uptime_s
from worker.storage import Storage
from worker.volumes import VolumeStore

MIB = 1 << 20
#: The steps of a boot as printed: the create's on the host, then the guest's.
_STEPS = ("pull", "disks", "vmm", "boot", "app")
#: The app prints "first-line" without naming it: the init logs the command it starts, and
#: a command holding the text itself would be "seen" in that log line, before the app ran.
APP = "printf 'first-%s\\n' line; i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done"


async def wait_for(path: Path, text: str, after: int = 0, timeout: float = 120) -> float:
    with anyio.fail_after(timeout):
        while True:
            if path.exists() and text.encode() in path.read_bytes()[after:]:
                return time.perf_counter()
            await anyio.sleep(0.005)


#: CPU seconds the QEMU process had used when the first line was there, per kind of boot:
#: under TCG a boot is CPU-bound, so this compares boots on a machine others load too.
qemu_cpu: dict[str, list[float]] = {
    "vmfleet": [],
    "raw": [],
    "trivial": [],
    "trivial_pvh": [],
    "api": [],
}


def cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: The steps of the last create, as the engine reported them (OpContext.observe_create_phase).
create_steps: dict[str, float] = {}


def guest_steps(app_log: Path, create_s: float, boot_s: float) -> dict[str, float]:
    """The guest's part of a boot with no agent to wait for: kernel to init (the uptime the
    init logs) and init to the app's first line (the rest of the boot after the create)."""
    kernel = init_uptime_s(app_log) or 0.0
    return {"boot": kernel, "app": max(boot_s - create_s - kernel, 0.0)}


def app_create(iid: str, image: str) -> Create:
    """The create every boot of this bench makes: 256 MiB, 1 vCPU, the app printing a line."""
    return Create(
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


async def vmfleet_round(
    engine: HostEngine, image: str, n: int, boot_only: bool = False
) -> tuple[tuple[float, float, float], dict[str, float]]:
    iid = f"bench{n:04d}"
    create = app_create(iid, image)
    create_steps.clear()
    await settle()
    start = time.perf_counter()
    try:
        await engine.execute(create)
        created = time.perf_counter() - start
        app_log = engine.instance(iid).guest.app_log
        boot = await wait_for(app_log, "first-line") - start
        process = engine.instance(iid).process
        if process is not None:
            qemu_cpu["vmfleet"].append(cpu_s(process.pid))
        steps = {k: v for k, v in create_steps.items() if k in ("pull", "disks", "vmm")}
        steps.update(guest_steps(app_log, created, boot))
        if boot_only:
            return (boot, math.nan, math.nan), steps
        await wait_for(app_log, "tick 2")
        start = time.perf_counter()
        await engine.execute(Standby(id=f"s{iid}", instance_id=iid, issued_at=utc_now()))
        standby = time.perf_counter() - start
        size = app_log.stat().st_size
        start = time.perf_counter()
        await engine.execute(Restore(id=f"r{iid}", instance_id=iid, issued_at=utc_now()))
        await wait_for(app_log, "tick", after=size)
        restore = time.perf_counter() - start
        return (boot, standby, restore), steps
    finally:
        with anyio.CancelScope(shield=True):
            await engine.execute(Delete(id=f"d{iid}", instance_id=iid, issued_at=utc_now()))


#: The trivial init: what any init must do at least, print a line (and no more).
TRIVIAL_INIT = b"#!/bin/busybox sh\n/bin/busybox echo first-line\nexec /bin/busybox poweroff -f\n"


def trivial_initrd(path: Path) -> Path:
    """An initrd holding busybox and an /init that prints one line and powers off."""
    entries = [_Entry(name, stat.S_IFDIR | 0o755) for name in ("bin", "dev", "proc", "sys")] + [
        _Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        _Entry("init", stat.S_IFREG | 0o755, TRIVIAL_INIT),
        _Entry("bin/busybox", stat.S_IFREG | 0o755, DEFAULT_BUSYBOX.read_bytes()),
    ]
    with open(path, "wb") as out:
        _write_cpio(out, entries)
    return path


def replace_arg(argv: list[str], flag: str, value: Path) -> list[str]:
    at = argv.index(flag) + 1
    return [*argv[:at], str(value), *argv[at + 1 :]]


#: The kernel as Debian ships it (a bzImage): what plain QEMU boots, the trivial baseline.
#: vmfleet boots the PVH vmlinux inside it (worker.guest.vmlinux.boot_kernel).
shipped_kernel: list[Path] = []


async def trivial_round(argv: list[str], workdir: Path, kernel: Path | None = None) -> float:
    """Plain QEMU, the same command line but the kernel as shipped (``kernel``: another),
    the trivial initrd: QEMU's start to the init's line."""
    console = workdir / "console.log"
    console.unlink(missing_ok=True)
    argv = replace_arg(argv, "-initrd", trivial_initrd(workdir / "trivial.img"))
    argv = replace_arg(argv, "-kernel", kernel or shipped_kernel[0])
    await settle()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        boot = await wait_for(console, "first-line") - start
        qemu_cpu["trivial" if kernel is None else "trivial_pvh"].append(cpu_s(proc.pid))
        return boot
    finally:
        proc.kill()
        proc.wait()


#: The last raw round's QEMU command line (the trivial init boots with it too).
raw_argv: list[str] = []
#: The trivial init booted from vmfleet's own kernel file (the PVH vmlinux): how much of
#: the gap to the baseline is the init's work rather than the way the kernel boots.
trivial_pvh: list[float] = []


async def raw_round(
    engine: HostEngine, image_disk: str, workdir: Path, boot_only: bool = False
) -> tuple[float, float, float, float]:
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
            # Sparse, and flushed before anything is timed: a 256 MiB overlay of zeros
            # written back during the next boot slowed the baseline down.
            subprocess.run(
                ["cp", "--sparse=always", disk.path, probe / Path(disk.path).name], check=True
            )
    os.sync()
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
    raw_argv[:] = argv
    trivial = await trivial_round(argv, probe)
    trivial_pvh.append(await trivial_round(argv, probe, kernel=Path(spec.kernel)))
    (probe / "console.log").unlink(missing_ok=True)
    await settle()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        boot = await wait_for(probe / "console.log", "first-line") - start
        qemu_cpu["raw"].append(cpu_s(proc.pid))
        if boot_only:
            return boot, math.nan, math.nan, trivial
        await wait_for(probe / "console.log", "tick 2")
        qmp = RawQmp(probe / "qmp.sock")
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
        qmp = RawQmp(probe / "qmp.sock")
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
    return boot, standby, restore, trivial


#: A cold boot against the trivial init ([5/6]): at most this many times its time.
COLD_BOOT_GOAL = 1.15


def report_trivial(
    summary: Summary, runs: int, trivial: float, med: dict[str, list[float]]
) -> None:
    """The engine's and the raw same-initrd boot against the trivial init's."""
    cpu = {k: statistics.median(v) for k, v in qemu_cpu.items() if v}
    if trivial_pvh:
        pvh = statistics.median(trivial_pvh)
        print(
            f"trivial init, the kernel as shipped (bzImage) {trivial:.3f} s; from vmfleet's "
            f"PVH vmlinux {pvh:.3f} s (engine boot vs that: {med['vmfleet'][0] / pvh:.2f}x)"
        )
    for name, key in (("vmfleet engine", "vmfleet"), ("raw, same initrd", "raw")):
        boot = med[key][0]
        print(
            f"{name} boot {boot:.3f} s vs trivial init {trivial:.3f} s: "
            f"{boot / trivial:.2f}x (goal <= {COLD_BOOT_GOAL}x); QEMU CPU to the first line "
            f"{cpu.get(key, math.nan):.2f} s vs {cpu.get('trivial', math.nan):.2f} s: "
            f"{cpu.get(key, math.nan) / cpu.get('trivial', math.nan):.2f}x"
        )
    summary.add(
        f"cold boot vs trivial init (median of {runs})",
        round(med["vmfleet"][0], 3),
        unit="s",
        baseline=round(trivial, 3),
        baseline_name="plain QEMU, same kernel, busybox init printing one line",
        ratio=round(med["vmfleet"][0] / trivial, 3),
        goal=f"<= {COLD_BOOT_GOAL}x",
        met=med["vmfleet"][0] / trivial <= COLD_BOOT_GOAL,
        issue="5/6",
    )


#: [5/6]'s goal: create -> the app's first line from a warm template, at most this many
#: times the trivial init's raw boot of the same kernel.
TEMPLATE_GOAL = 0.4


async def template_start_rounds(
    ctx: OpContext, engine: HostEngine, image: str, runs: int
) -> list[float]:
    """Warm-template starts: create -> the app's first line, for creates of vmfleet_round's
    shape resumed from its template (built once first, untimed; worker/templates)."""
    from worker.templates import TemplateManager, TemplateShape

    manager = TemplateManager(
        ctx.storage.guests.parent / "templates",
        ctx.driver,
        ctx.boot,
        budget_bytes=2 << 30,
        vmm_binary=shutil.which("qemu-system-x86_64"),
        shapes=(),
    )
    if await manager.ensure(TemplateShape(memory_bytes=256 * MIB, vcpus=1, network=True)) is None:
        raise SystemExit("the warm template could not be built: see the log")
    ctx.templates = manager
    times = []
    try:
        for n in range(runs):
            iid = f"tmpl{n:04d}"
            create = app_create(iid, image)
            await settle()
            start = time.perf_counter()
            try:
                await engine.execute(create)
                guest = engine.instance(iid).guest
                times.append(await wait_for(guest.app_log, "first-line") - start)
                if "from a warm template" not in guest.ops_log.read_text():
                    raise SystemExit(f"{iid} booted cold: the template was not used")
            finally:
                with anyio.CancelScope(shield=True):
                    await engine.execute(Delete(id=f"d{iid}", instance_id=iid, issued_at=utc_now()))
    finally:
        ctx.templates = None
    return times


def api_qemu_cpu(guests: Path) -> None:
    """The CPU seconds of the stack's one VM so far (its pid file), into qemu_cpu["api"]."""
    for pid_file in guests.glob("*/vmm.pid"):
        with contextlib.suppress(OSError, ValueError):
            qemu_cpu["api"].append(cpu_s(int(pid_file.read_text())))


def first_line_by_name(
    client: httpx.Client, name: str, start: float, seen: list[float], guests: Path | None = None
) -> None:
    """Follow ``name``'s app log from the moment the instance exists (a 404 before that is
    asked again), so the first line is timed when it is there, not after the create's
    answer (which waits for the guest agent). ``guests``: the stack's guest directories,
    to read its one VM's QEMU CPU then (``qemu_cpu["api"]``)."""
    params = {"follow": "true", "tail": "1000"}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with client.stream("GET", f"/instances/{name}/logs", params=params) as lines:
            if lines.status_code == 404:
                time.sleep(0.005)
                continue
            for raw in lines.iter_lines():
                if raw.startswith("data: ") and "first-line" in raw:
                    seen.append(time.perf_counter() - start)
                    if guests is not None:
                        api_qemu_cpu(guests)
                    return
        time.sleep(0.005)  # a stream that ended before the line (not found yet): again


def pull_ready(client: httpx.Client, image: str) -> None:
    """POST /images, then wait until the image is ready."""
    response = client.post("/images", json={"name": image})
    assert response.status_code in (200, 202), response.text
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = client.get(f"/images/{quote(image, safe='')}").json().get("status")
        if status == "ready":
            return
        assert status in ("pending", "pulling", "converting"), status
        time.sleep(0.1)
    raise SystemExit(f"{image} was not ready within 300 s")


async def api_cold_boots(
    image: str, runs: int, work: Path
) -> tuple[list[float], list[float], list[float]]:
    """Create -> the app's first line through `vmfleet dev`'s HTTP API: POST /instances
    while another client follows ``GET /instances/{name}/logs?follow=true`` (SSE); also
    the create's own answer (at Running). Each round with a trivial-init boot of its own
    (the machine's load changes between rounds), before the create in even rounds and
    after it in odd ones: a boot measured right after another one reads differently here
    (the same create: 2.23 s median after the trivial boot, 2.12 s before it)."""
    times: list[float] = []
    answered: list[float] = []
    trivial: list[float] = []
    probe = work / "raw"
    timeout = httpx.Timeout(300, read=None)
    with (
        dev_stack(work / "dev", free_port(), host_id="bench-boot", banner_timeout_s=180) as stack,
        httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=timeout) as client,
        httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=timeout) as logs,
    ):
        # As a hypeman client does: the image pulled first (POST /images), then the creates.
        pull_ready(client, image)
        for n in range(runs):
            trivial_first = n % 2 == 0
            if trivial_first:
                trivial.append(await trivial_round(raw_argv, probe))
            name = f"api{n}"
            body = {"name": name, "image": image, "size": "256MB", "vcpus": 1}
            await settle()
            start = time.perf_counter()
            reader = threading.Thread(
                target=first_line_by_name,
                args=(logs, name, start, times, stack.data_dir / "guests"),
                daemon=True,
            )
            reader.start()
            created = client.post("/instances", json={**body, "cmd": ["/bin/sh", "-c", APP]})
            answered.append(time.perf_counter() - start)
            assert created.status_code == 201, created.text
            iid = created.json()["id"]
            try:
                reader.join(timeout=300)
                phases = client.get(f"/instances/{iid}").json().get("phase_durations_ms")
                print(
                    f"api round {n}: first line {times[-1]:.3f} s, create answered "
                    f"{answered[-1]:.3f} s, phases (ms) {phases}",
                    file=sys.stderr,
                )
            finally:
                client.delete(f"/instances/{iid}")
            if not trivial_first:
                trivial.append(await trivial_round(raw_argv, probe))
    return times, answered, trivial


def report_api(summary: Summary, runs: int, api: float, trivial: float) -> None:
    cpu = {k: statistics.median(v) if v else math.nan for k, v in qemu_cpu.items()}
    print(
        f"cold boot through the HTTP API {api:.3f} s vs trivial init {trivial:.3f} s: "
        f"{api / trivial:.2f}x (goal <= {COLD_BOOT_GOAL}x); QEMU CPU to the first line "
        f"{cpu['api']:.2f} s vs {cpu['trivial']:.2f} s: {cpu['api'] / cpu['trivial']:.2f}x "
        f"(the engine's {cpu['vmfleet']:.2f} s)"
    )
    summary.add(
        f"cold boot through the HTTP API, create -> first line (median of {runs})",
        round(api, 3),
        unit="s",
        baseline=round(trivial, 3),
        baseline_name="plain QEMU, same kernel, busybox init printing one line",
        ratio=round(api / trivial, 3),
        goal=f"<= {COLD_BOOT_GOAL}x",
        met=api / trivial <= COLD_BOOT_GOAL,
        issue="5/6",
    )


def report_template(
    summary: Summary, runs: int, template: float, trivial: float, cold: float
) -> None:
    print(
        f"warm-template start {template:.3f} s vs trivial init {trivial:.3f} s: "
        f"{template / trivial:.2f}x (goal <= {TEMPLATE_GOAL}x); cold boot {cold:.3f} s"
    )
    summary.add(
        f"warm-template start vs trivial init (median of {runs})",
        round(template, 3),
        unit="s",
        baseline=round(trivial, 3),
        baseline_name="plain QEMU, same kernel, busybox init printing one line",
        ratio=round(template / trivial, 3),
        goal=f"<= {TEMPLATE_GOAL}x",
        met=template / trivial <= TEMPLATE_GOAL,
        issue="5/6",
    )


async def main(
    runs: int, as_json: bool = False, boot_only: bool = False, api: bool = False
) -> None:
    assets = Path(__file__).resolve().parents[1] / ".cache" / "test-assets"
    work = Path(tempfile.mkdtemp(prefix="vb", dir="/tmp"))
    registry = None
    try:
        kernel = await ensure_kernel(assets)
        shipped_kernel[:] = [kernel.bzimage]
        booted = await boot_kernel(kernel.bzimage)
        initrd = await ensure_initrd(assets, kernel)
        accel = await choose_accel(
            assets,
            qemu=shutil.which("qemu-system-x86_64") or "",
            kernel=booted,
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
            boot=BootAssets(kernel=booted, initrd=initrd, accel=accel, agent=DEFAULT_AGENT),
            observe_create_phase=create_steps.__setitem__,
        )
        engine = HostEngine(ctx)
        await ctx.images.pull(image)  # the cache is warm in both cases
        results: dict[str, list[tuple[float, float, float]]] = {"vmfleet": [], "raw": []}
        trivial: list[float] = []
        steps: list[dict[str, float]] = []
        for n in range(runs):
            *raw, trivial_boot = await raw_round(engine, image, work, boot_only)
            results["raw"].append((raw[0], raw[1], raw[2]))
            trivial.append(trivial_boot)
            timings, round_steps = await vmfleet_round(engine, image, n, boot_only)
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
        for i, label in enumerate(["boot"] if boot_only else ["boot", "standby", "restore"]):
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
        report_trivial(summary, runs, statistics.median(trivial), med)
        if api:
            api_boots, api_answers, api_trivial = await api_cold_boots(image, runs, work)
            report_api(summary, runs, statistics.median(api_boots), statistics.median(api_trivial))
            print(
                f"  the create's answer (at Running: the guest agent answered) "
                f"{statistics.median(api_answers):.3f} s"
            )
        warm = statistics.median(await template_start_rounds(ctx, engine, image, runs))
        report_template(summary, runs, warm, statistics.median(trivial), med["vmfleet"][0])
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
    parser.add_argument("--boot-only", action="store_true", help="no standby and restore")
    parser.add_argument(
        "--api", action="store_true", help="also cold boots through `vmfleet dev`'s HTTP API"
    )
    args = parser.parse_args()
    anyio.run(main, args.runs, args.json, args.boot_only, args.api)
