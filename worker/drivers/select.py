"""Which hypervisor a host runs (VMFLEET_HYPERVISOR), and the drivers its VMs need.

- ``qemu``: QEMU, with KVM where a probe boot proves KVM runs guests, else TCG.
- ``cloud-hypervisor``: Cloud Hypervisor, or a start-up refusal in one line when it cannot
  run here: no binary (PATH or VMFLEET_CH_BINARY), user-mode networking (CH has none), or a
  probe guest that does not boot under it (no working KVM).
- ``auto``: Cloud Hypervisor when all of that holds, QEMU otherwise.

The probe boots the real kernel and initrd with ``vmfleet.probe=1`` (the init prints a
marker and powers off) and is cached in ``<assets>/system/ch-probe.json`` per (binary,
kernel, initrd), like QEMU's accelerator probe; delete it to probe again. A forced
``cloud-hypervisor`` probes again rather than trust a cached failure.

New VMs boot under the host's hypervisor. A VM keeps the one that made it
(``VmSpec.hypervisor``), and so does its snapshot: :class:`DriverSet` routes every call by
the spec, so an instance left in standby by QEMU is restored by QEMU after the host moved
to Cloud Hypervisor (and the reverse), or refused in one line if that hypervisor is gone.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import HypervisorError
from worker.accel import choose_accel
from worker.drivers import cloud_hypervisor, qemu
from worker.drivers.base import AgentEndpoint, Capabilities, DiskSpec, Hypervisor, VmSpec, VmState
from worker.drivers.cloud_hypervisor import NAME as CLOUD_HYPERVISOR
from worker.drivers.cloud_hypervisor import CloudHypervisorDriver, find_ch_binary
from worker.drivers.qemu import QemuDriver
from worker.probe import (
    cache_key,
    kill_leftover_probe,
    marked,
    probe_spec,
    tracked_probe,
    wait_for_marker,
)
from worker.proc import VmmProcess, log_tail
from worker.storage import write_atomic

__all__ = [
    "DriverSet",
    "HostHypervisor",
    "HypervisorUnavailable",
    "check_hypervisor_setting",
    "choose_hypervisor",
    "probe_cloud_hypervisor",
]

log = logging.getLogger(__name__)

QEMU = "qemu"
#: Boots the init to its probe marker, under CH's 8250 serial port like every CH guest.
PROBE_NAME = "vmfleet-chprobe"

#: (API socket, guest control channel) in a VM's run directory, per hypervisor.
_SOCKETS = {
    QEMU: (qemu.QMP_SOCKET, qemu.CONTROL_SOCKET),
    CLOUD_HYPERVISOR: (cloud_hypervisor.API_SOCKET, cloud_hypervisor.CONTROL_LINK),
}


class HypervisorUnavailable(HypervisorError):
    """The configured hypervisor cannot run on this host: a start-up refusal."""


class DriverSet:
    """The host's drivers behind the :class:`Hypervisor` interface: ``primary`` for new VMs,
    and whichever driver a spec names for everything else (made on first use)."""

    def __init__(self, primary: Hypervisor, others: Mapping[str, Callable[[], Hypervisor]]) -> None:
        self.primary = primary
        self.name = primary.name
        self.capabilities: Capabilities = primary.capabilities
        self._factories = dict(others)
        self._drivers: dict[str, Hypervisor] = {primary.name: primary}

    def driver_for(self, spec: VmSpec) -> Hypervisor:
        name = spec.hypervisor
        driver = self._drivers.get(name)
        if driver is not None:
            return driver
        factory = self._factories.get(name)
        if factory is None:
            raise HypervisorError(f"this VM runs under {name}, which vmfleet does not know")
        try:
            driver = self._drivers[name] = factory()
        except HypervisorError as exc:
            raise HypervisorError(f"this VM runs under {name}, not available here: {exc}") from exc
        return driver

    # Socket paths are answered without the driver: recovery asks them of every VM, also
    # of one whose hypervisor is no longer installed (it is then Unknown, not a crash).

    def api_socket(self, spec: VmSpec) -> Path:
        return Path(spec.run_dir) / _SOCKETS.get(spec.hypervisor, _SOCKETS[QEMU])[0]

    def control_socket(self, spec: VmSpec) -> Path:
        return Path(spec.run_dir) / _SOCKETS.get(spec.hypervisor, _SOCKETS[QEMU])[1]

    def agent_endpoint(self, spec: VmSpec) -> AgentEndpoint | None:
        if spec.hypervisor == CLOUD_HYPERVISOR:
            return cloud_hypervisor.agent_endpoint(spec)
        return qemu.agent_endpoint(spec)

    async def boot(self, spec: VmSpec, *, vmm_log: Path) -> VmmProcess:
        return await self.driver_for(spec).boot(spec, vmm_log=vmm_log)

    async def state(self, spec: VmSpec, process: VmmProcess) -> VmState:
        return await self.driver_for(spec).state(spec, process)

    async def snapshot(self, spec: VmSpec, process: VmmProcess, snapshot_dir: Path) -> None:
        await self.driver_for(spec).snapshot(spec, process, snapshot_dir)

    async def restore(self, spec: VmSpec, snapshot_dir: Path, *, vmm_log: Path) -> VmmProcess:
        return await self.driver_for(spec).restore(spec, snapshot_dir, vmm_log=vmm_log)

    async def save_live(
        self,
        spec: VmSpec,
        process: VmmProcess,
        snapshot_dir: Path,
        while_paused: Callable[[], Awaitable[None]],
    ) -> None:
        await self.driver_for(spec).save_live(spec, process, snapshot_dir, while_paused)

    async def restore_swapped(
        self, spec: VmSpec, saved_spec: VmSpec, snapshot_dir: Path, *, vmm_log: Path
    ) -> VmmProcess:
        return await self.driver_for(spec).restore_swapped(
            spec, saved_spec, snapshot_dir, vmm_log=vmm_log
        )

    async def resume(self, spec: VmSpec, process: VmmProcess) -> None:
        await self.driver_for(spec).resume(spec, process)

    async def power_off(self, spec: VmSpec, process: VmmProcess, timeout_s: float) -> bool:
        return await self.driver_for(spec).power_off(spec, process, timeout_s)

    async def attach_disk(self, spec: VmSpec, process: VmmProcess, disk: DiskSpec) -> None:
        await self.driver_for(spec).attach_disk(spec, process, disk)

    async def detach_disk(self, spec: VmSpec, process: VmmProcess, disk: DiskSpec) -> None:
        await self.driver_for(spec).detach_disk(spec, process, disk)


# -- choosing the host's hypervisor ------------------------------------------------------------


@dataclass(frozen=True)
class HostHypervisor:
    drivers: DriverSet
    #: What new VMs' specs say (QEMU's choice; Cloud Hypervisor always runs on KVM).
    accel: str


def check_hypervisor_setting(setting: str, *, network_mode: str, ch_binary: Path | None) -> None:
    """The refusals that need no kernel, made before anything on the host is touched."""
    if setting != CLOUD_HYPERVISOR:
        return
    if network_mode != "bridge":
        raise HypervisorUnavailable(
            "VMFLEET_HYPERVISOR=cloud-hypervisor needs VMFLEET_NETWORK=bridge: "
            "Cloud Hypervisor has no user-mode networking"
        )
    if find_ch_binary(ch_binary) is None:
        raise HypervisorUnavailable(f"VMFLEET_HYPERVISOR=cloud-hypervisor: {_no_binary(ch_binary)}")


async def choose_hypervisor(
    setting: str,
    *,
    network_mode: str,
    ch_binary: Path | None,
    assets_dir: Path,
    kernel: Path,
    initrd: Path,
    probe_timeout_s: float = 20.0,
) -> HostHypervisor:
    """The host's drivers, the primary one chosen as VMFLEET_HYPERVISOR says."""
    check_hypervisor_setting(setting, network_mode=network_mode, ch_binary=ch_binary)
    others: dict[str, Callable[[], Hypervisor]] = {
        QEMU: QemuDriver,
        CLOUD_HYPERVISOR: lambda: CloudHypervisorDriver(binary=find_ch_binary(ch_binary)),
    }
    ch = await _usable_cloud_hypervisor(
        setting,
        network_mode=network_mode,
        ch_binary=ch_binary,
        assets_dir=assets_dir,
        kernel=kernel,
        initrd=initrd,
        timeout_s=probe_timeout_s,
    )
    if ch is not None:
        log.info("hypervisor: cloud-hypervisor (%s)", ch.binary)
        return HostHypervisor(DriverSet(ch, others), accel="kvm")
    try:
        primary = QemuDriver()
    except HypervisorError as exc:
        raise HypervisorUnavailable(f"VMFLEET_HYPERVISOR={setting}: {exc}") from exc
    accel = await choose_accel(assets_dir, qemu=primary.binary, kernel=kernel, initrd=initrd)
    log.info("hypervisor: qemu (%s, %s)", primary.binary, accel)
    return HostHypervisor(DriverSet(primary, others), accel=accel)


async def _usable_cloud_hypervisor(
    setting: str,
    *,
    network_mode: str,
    ch_binary: Path | None,
    assets_dir: Path,
    kernel: Path,
    initrd: Path,
    timeout_s: float,
) -> CloudHypervisorDriver | None:
    """CH if the setting allows it and it works here; None for QEMU. A forced
    ``cloud-hypervisor`` that does not work is refused instead."""
    forced = setting == CLOUD_HYPERVISOR
    if setting == QEMU:
        return None
    if network_mode != "bridge":
        log.info("hypervisor auto: QEMU, Cloud Hypervisor has no user-mode networking")
        return None
    binary = find_ch_binary(ch_binary)
    if binary is None:
        log.info("hypervisor auto: QEMU, %s", _no_binary(ch_binary))
        return None
    driver = CloudHypervisorDriver(binary=binary)
    failure = await probe_cloud_hypervisor(
        driver,
        assets_dir=assets_dir,
        kernel=kernel,
        initrd=initrd,
        timeout_s=timeout_s,
        trust_cached_failure=not forced,
    )
    if failure is None:
        return driver
    if forced:
        raise HypervisorUnavailable(f"VMFLEET_HYPERVISOR=cloud-hypervisor: {failure}")
    log.warning("hypervisor auto: QEMU, because %s", failure)
    return None


def _no_binary(configured: Path | None) -> str:
    if configured is not None:
        return f"VMFLEET_CH_BINARY={configured} is not an executable file"
    return "no cloud-hypervisor on PATH (install it, or set VMFLEET_CH_BINARY)"


# -- the probe ---------------------------------------------------------------------------------


async def probe_cloud_hypervisor(
    driver: CloudHypervisorDriver,
    *,
    assets_dir: Path,
    kernel: Path,
    initrd: Path,
    timeout_s: float = 20.0,
    trust_cached_failure: bool = True,
) -> str | None:
    """None when a probe guest boots to the init under ``driver``; else why not (one line)."""
    system = assets_dir / "system"
    cache, pid_file = system / "ch-probe.json", system / "ch-probe.pid"
    await kill_leftover_probe(pid_file, cmdline_must_contain=PROBE_NAME)
    key = cache_key(Path(driver.binary), kernel, initrd)
    cached = _read_cache(cache, key)
    if cached is not None and (cached[0] or trust_cached_failure):
        return None if cached[0] else cached[1]
    system.mkdir(parents=True, exist_ok=True)
    failure = await _probe_boot(driver, kernel, initrd, pid_file, timeout_s)
    record = {"key": key, "ok": failure is None, "reason": failure or ""}
    write_atomic(cache, json.dumps(record).encode())
    log.info("cloud-hypervisor probe: %s", failure or "a guest booted")
    return failure


async def _probe_boot(
    driver: CloudHypervisorDriver, kernel: Path, initrd: Path, pid_file: Path, timeout_s: float
) -> str | None:
    with tempfile.TemporaryDirectory(prefix=f"{PROBE_NAME}-") as tmp:
        run = Path(tmp)
        spec = probe_spec(kernel, initrd, run, hypervisor=CLOUD_HYPERVISOR)
        console, vmm_log = Path(spec.serial_log), run / "vmm.log"
        try:
            process = await driver.boot(spec, vmm_log=vmm_log)
        except HypervisorError as exc:
            # A quick guest may be done (and CH gone) before boot() has finished asking.
            return None if marked(console) else f"the probe guest did not start: {exc}"
        async with tracked_probe(process, pid_file):
            if await wait_for_marker(process, console, timeout_s):
                return None
        return (
            f"a probe guest did not boot under {driver.binary} within {timeout_s:g}s "
            f"(does KVM run guests here?); console: {log_tail(console)}; "
            f"vmm.log: {log_tail(vmm_log)}"
        )


def _read_cache(path: Path, key: str) -> tuple[bool, str] | None:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None
    return bool(cached.get("ok")), str(cached.get("reason") or "")
