"""Probe boots: booting the real guest kernel and initrd once to learn whether a
hypervisor (QEMU under KVM, Cloud Hypervisor) really runs guests on this host.

With ``vmfleet.probe=1`` the init prints :data:`PROBE_MARKER` and powers off at once.
A probe's pid is kept in a file while it runs: a worker SIGKILLed mid-probe would leave a
guest spinning on a broken KVM for good, and the next worker kills it instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from worker.drivers.base import VmSpec
from worker.guest import BOOT_ARGS
from worker.proc import VmmProcess
from worker.storage import write_atomic

__all__ = [
    "PROBE_CMDLINE",
    "PROBE_MARKER",
    "cache_key",
    "kill_leftover_probe",
    "marked",
    "probe_spec",
    "tracked_probe",
    "wait_for_marker",
]

log = logging.getLogger(__name__)

PROBE_MARKER = "vmfleet-probe-ok"
#: As an instance boots (BOOT_ARGS), to the init and no further.
PROBE_CMDLINE = f"{BOOT_ARGS} vmfleet.probe=1"


def probe_spec(kernel: Path, initrd: Path, run_dir: Path, *, hypervisor: str) -> VmSpec:
    """The smallest VM that boots the init: 1 vCPU, 256 MiB, no disk, KVM."""
    return VmSpec(
        instance_id="probe",
        vcpus=1,
        memory_bytes=256 << 20,
        kernel=str(kernel),
        initrd=str(initrd),
        cmdline=PROBE_CMDLINE,
        disks=(),
        serial_log=str(run_dir / "console.log"),
        run_dir=str(run_dir),
        accel="kvm",
        hotplug_slots=0,
        hypervisor=hypervisor,
    )


def marked(console: Path) -> bool:
    try:
        return PROBE_MARKER in console.read_text(errors="replace")
    except OSError:
        return False


async def wait_for_marker(process: VmmProcess, console: Path, timeout_s: float) -> bool:
    """True once the guest printed the marker; False if the VMM exited or time ran out."""
    with anyio.move_on_after(timeout_s):
        while process.running():  # a guest writes to a file: there is no event to wait for
            if marked(console):
                return True
            await anyio.sleep(0.05)
    return marked(console)


@contextlib.asynccontextmanager
async def tracked_probe(process: VmmProcess, pid_file: Path) -> AsyncIterator[VmmProcess]:
    """Keep the probe's pid in ``pid_file`` while it runs; kill and reap it at the end."""
    write_atomic(pid_file, str(process.pid).encode())
    try:
        yield process
    finally:
        await process.kill_and_reap()
        pid_file.unlink(missing_ok=True)


async def kill_leftover_probe(pid_file: Path, *, cmdline_must_contain: str) -> None:
    """Kill the probe a previous worker of this host left running, if any."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    leftover = VmmProcess.adopt(pid, cmdline_must_contain=cmdline_must_contain)
    if leftover is not None:
        log.warning("killing the probe (pid %d) a previous worker left running", pid)
        await leftover.kill_and_reap()
    pid_file.unlink(missing_ok=True)


def cache_key(*paths: Path) -> str:
    """Changes when any of the probe's inputs (binary, kernel, initrd) changes."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
