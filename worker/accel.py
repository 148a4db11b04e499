"""Which accelerator QEMU should use here, found by booting, not by looking at /dev/kvm.

Some hosts have a /dev/kvm that cannot run a stock guest kernel (a paravirtual KVM such
as kvm-pvm resets it in early boot, or spins). So a probe boots the real kernel and initrd
under KVM (:mod:`worker.probe`) and gives up after ``timeout_s``: a guest that KVM really
runs reaches the init within a second or two. The answer is cached per (kernel, initrd,
QEMU binary) in ``<data>/system/accel.json``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from worker.drivers.qemu import build_args
from worker.probe import (
    cache_key,
    kill_leftover_probe,
    probe_spec,
    tracked_probe,
    wait_for_marker,
)
from worker.proc import spawn_vmm
from worker.storage import write_atomic

__all__ = ["choose_accel"]

log = logging.getLogger(__name__)

#: The probe VM's QEMU ``-name`` (``vmfleet-<instance id>``): how a leftover one is known.
_PROBE_NAME = "vmfleet-probe"


async def choose_accel(
    data_dir: Path, *, qemu: str, kernel: Path, initrd: Path, timeout_s: float = 20.0
) -> str:
    """``"kvm"`` when a probe boot under KVM reached the init, else ``"tcg"``."""
    cache = data_dir / "system" / "accel.json"
    pid_file = data_dir / "system" / "accel-probe.pid"
    await kill_leftover_probe(pid_file, cmdline_must_contain=_PROBE_NAME)
    key = cache_key(Path(qemu), kernel, initrd)
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


async def _probe_boot(
    qemu: str, kernel: Path, initrd: Path, pid_file: Path, timeout_s: float
) -> bool:
    with tempfile.TemporaryDirectory(prefix="vmfleet-probe-") as tmp:
        run = Path(tmp)
        spec = probe_spec(kernel, initrd, run, hypervisor="qemu")
        try:
            process = await spawn_vmm(
                build_args(spec, binary=qemu),
                log_path=run / "vmm.log",
                socket_path=run / "qmp.sock",
            )
        except Exception as exc:
            log.info("KVM probe: QEMU did not start under KVM (%s)", exc)
            return False
        async with tracked_probe(process, pid_file):
            return await wait_for_marker(process, Path(spec.serial_log), timeout_s)


def _read_cache(path: Path, key: str) -> str | None:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    accel = cached.get("accel")
    return accel if cached.get("key") == key and accel in ("kvm", "tcg") else None
