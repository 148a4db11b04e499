"""Which accelerator QEMU should use here, found by booting, not by looking at /dev/kvm.

Some hosts have a /dev/kvm that cannot run a stock guest kernel (a paravirtual KVM such
as kvm-pvm resets it in early boot). So the probe boots the real kernel and initrd under
KVM with ``vmfleet.probe=1``, for which the init prints a marker and powers off at once.
The answer is cached per (kernel, initrd, QEMU binary) in ``<data>/system/accel.json``.

On some such hosts the KVM guest neither boots nor resets: it spins. The probe gives up
after ``timeout_s`` (a guest that KVM really runs reaches the init within a second or two),
and it keeps the probe QEMU's pid in ``<data>/system/accel-probe.pid`` so that a probe whose
worker was SIGKILLed mid-way is killed by the next worker instead of spinning forever.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import anyio

from worker.drivers.base import VmSpec
from worker.drivers.qemu import build_args
from worker.proc import VmmProcess, spawn_vmm
from worker.storage import write_atomic

__all__ = ["PROBE_MARKER", "choose_accel"]

log = logging.getLogger(__name__)

PROBE_MARKER = "vmfleet-probe-ok"


PROBE_NAME = "vmfleet-probe"


async def choose_accel(
    data_dir: Path, *, qemu: str, kernel: Path, initrd: Path, timeout_s: float = 20.0
) -> str:
    """``"kvm"`` when a probe boot under KVM reached the init, else ``"tcg"``."""
    cache = data_dir / "system" / "accel.json"
    pid_file = data_dir / "system" / "accel-probe.pid"
    await _kill_leftover_probe(pid_file)
    key = _cache_key(qemu, kernel, initrd)
    cached = _read_cache(cache, key)
    if cached is not None:
        return cached
    cache.parent.mkdir(parents=True, exist_ok=True)
    accel = (
        "kvm"
        if _kvm_device_usable() and await _probe_boot(qemu, kernel, initrd, pid_file, timeout_s)
        else "tcg"
    )
    write_atomic(cache, json.dumps({"key": key, "accel": accel}).encode())
    log.info("accelerator: %s", accel)
    return accel


def _kvm_device_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


async def _kill_leftover_probe(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    leftover = VmmProcess.adopt(pid, cmdline_must_contain=PROBE_NAME)
    if leftover is not None:
        log.warning("killing the KVM probe (pid %d) a previous worker left running", pid)
        await leftover.kill_and_reap()
    pid_file.unlink(missing_ok=True)


async def _probe_boot(
    qemu: str, kernel: Path, initrd: Path, pid_file: Path, timeout_s: float
) -> bool:
    with tempfile.TemporaryDirectory(prefix="vmfleet-probe-") as tmp:
        run = Path(tmp)
        console = run / "console.log"
        spec = VmSpec(
            instance_id="probe",
            vcpus=1,
            memory_bytes=256 << 20,
            kernel=str(kernel),
            initrd=str(initrd),
            cmdline="console=ttyS0 quiet panic=-1 vmfleet.probe=1",
            disks=(),
            serial_log=str(console),
            run_dir=str(run),
            accel="kvm",
            hotplug_slots=0,
        )
        try:
            process = await spawn_vmm(
                build_args(spec, binary=qemu),
                log_path=run / "vmm.log",
                socket_path=run / "qmp.sock",
            )
        except Exception as exc:
            log.info("KVM probe: QEMU did not start under KVM (%s)", exc)
            return False
        write_atomic(pid_file, str(process.pid).encode())
        try:
            return await _wait_for_marker(process, console, timeout_s)
        finally:
            pid_file.unlink(missing_ok=True)


async def _wait_for_marker(process: VmmProcess, console: Path, timeout_s: float) -> bool:
    try:
        with anyio.move_on_after(timeout_s):
            while process.running():
                if PROBE_MARKER in console.read_text(errors="replace"):
                    return True
                await anyio.sleep(0.1)
        return PROBE_MARKER in console.read_text(errors="replace")
    finally:
        await process.kill_and_reap()


def _cache_key(qemu: str, kernel: Path, initrd: Path) -> str:
    digest = hashlib.sha256()
    for path in (Path(qemu), kernel, initrd):
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_cache(path: Path, key: str) -> str | None:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    accel = cached.get("accel")
    return accel if cached.get("key") == key and accel in ("kvm", "tcg") else None
