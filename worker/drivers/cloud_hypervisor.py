"""Cloud Hypervisor driver: one ``cloud-hypervisor --api-socket <sock>`` per VM, driven over
its REST API (``vm.create``, ``vm.boot``, ...; see :mod:`worker.drivers.ch_api`).

Decisions (What / Why):
- The kernel is the PVH ``vmlinux`` extracted from the same Debian bzImage QEMU boots
  (:mod:`worker.guest.vmlinux`): Cloud Hypervisor cannot boot a bzImage, and one kernel
  package keeps both hypervisors' guests alike (same modules in the same initrd).
- The serial port (ttyS0, ``console=ttyS0``) goes to ``app.log`` in ``File`` mode, as in
  hypeman. CH truncates that file whenever it opens it (boot and restore), so the driver
  first moves the previous ``app.log`` to ``app.log.1``: the log shipper reads a replaced
  file to its end before following the new one, so no line is lost.
- The guest control channel is the virtio console (``/dev/hvc0``) in ``Pty`` mode. QEMU's
  channel is a second 8250 UART on a unix socket, but CH has one UART (taken by the app's
  output), and it refuses ``Socket`` mode for the virtio console ("No socket option support
  for console device", ``console_devices.rs``). vsock needs a guest program the busybox
  initrd does not have. So CH makes a pty, the driver reads its path from ``vm.info`` after
  boot and restore and keeps a symlink to it at ``run/ctl.pty``, and
  :mod:`worker.guest.control` talks to a pty as it talks to a socket. The guest is told
  ``vmfleet.ctl=hvc0`` on the kernel command line; its init starts the control loop once
  ``virtio_console`` is loaded (ttyS1 under QEMU exists from the start, as before).
- The guest agent's channel (specs with ``agent_channel``): CH's vsock device (guest CID
  3) whose host side is ``run/agent.vsock``; the host connects there and asks for the
  agent's port with ``CONNECT <port>``. The guest is told ``vmfleet.agent=vsock``. CH binds
  that socket itself at boot and restore, so a stale one is removed first.
- Memory: ``size`` is the spec's ``memory_bytes`` (the instance's size + hotplug_size),
  all of it from boot, as under QEMU; no virtio-mem region (see :mod:`worker.lifecycle.boot`).
- ``disk_io_bps``: a ``rate_limiter_config`` token bucket on every disk (hot-plugged ones
  too), as hypeman sets it. Network bandwidth is shaped with ``tc`` on the TAP by
  :mod:`worker.network.shaping`, as under QEMU: CH's own net limiter takes one bucket for
  both directions, and download and upload are limited separately.
- Networking: bridge mode only. A TAP NIC is ``{tap, mac}``; ``ip``/``mask`` are left out
  on purpose: they are the *host* side of the TAP, CH ignores them for a TAP that exists
  (vmfleet always makes it first, on the bridge), and would put them on a TAP it had to
  create itself. CH has no user-mode network stack, so a user-mode NIC is refused (the
  worker already refuses VMFLEET_NETWORK=user with Cloud Hypervisor at start-up).
- Standby: ``vm.pause`` → ``vm.snapshot`` (into the snapshot directory; on failure
  ``vm.resume``, and the VM goes on) → ``vmm.shutdown``. The CH version that took the
  snapshot is written beside it (``hypervisor.json``); a restore under any other version is
  refused before CH reads the snapshot, since CH snapshots are not portable across versions.
- Restore: a fresh CH → ``vm.restore`` (``prefault`` off: memory is paged in lazily) →
  ``vm.resume``.
- Stop: the guest's init powers the VM off (CH then exits on its own); failing that
  :meth:`power_off` sends ``vm.shutdown`` then ``vmm.shutdown``, and the lifecycle kills a
  VMM that still does not exit.
- Hot-plug: ``vm.add-disk`` with the disk's own ``id`` and ``serial``, ``vm.remove-device``
  by that id, then a wait until the guest has ejected it (the device leaves
  ``vm.info.device_tree``), as QEMU's driver waits for ``DEVICE_DELETED``.
- Every failure after the VMM started kills and reaps it and removes its socket and pty
  link: CH does not unlink its API socket when killed.
- A guest kernel panic reboots the VM (``panic=-1``): CH has no ``-no-reboot``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

from schemas.errors import HypervisorError
from worker.drivers.base import (
    AGENT_VSOCK_PORT,
    AgentEndpoint,
    Capabilities,
    DiskSpec,
    NicSpec,
    VmSpec,
    VmState,
)
from worker.drivers.ch_api import ChApi, ChApiError, open_ch_api
from worker.drivers.ch_wire import (
    ConsoleConfig,
    CpusConfig,
    DiskConfig,
    MemoryConfig,
    NetConfig,
    PayloadConfig,
    RateLimiterConfig,
    RestoreConfig,
    TokenBucket,
    VmConfig,
    VmRemoveDevice,
    VmSnapshotConfig,
    VsockConfig,
)
from worker.guest.errors import GuestAssetError
from worker.guest.vmlinux import ensure_vmlinux
from worker.proc import VmmProcess, spawn_vmm
from worker.storage import write_atomic

__all__ = [
    "AGENT_SOCKET",
    "API_SOCKET",
    "CONTROL_DEVICE",
    "CONTROL_LINK",
    "NAME",
    "CloudHypervisorDriver",
    "agent_endpoint",
    "build_vm_config",
    "find_ch_binary",
    "guest_cmdline",
]

NAME = "cloud-hypervisor"
API_SOCKET = "ch.sock"
#: A symlink to the pty CH made for the virtio console: the guest control channel.
CONTROL_LINK = "ctl.pty"
#: The guest's name for that console.
CONTROL_DEVICE = "hvc0"
#: The host side of the guest's vsock device (the agent's channel).
AGENT_SOCKET = "agent.vsock"
#: The guest's vsock CID (any number from 3 works: each VM has its own device).
GUEST_CID = 3
#: Beside a snapshot: which CH version wrote it.
ORIGIN_FILE = "hypervisor.json"


def find_ch_binary(configured: str | Path | None = None) -> str | None:
    """The CH binary: the configured one (VMFLEET_CH_BINARY) if executable, else on PATH."""
    if configured:
        path = Path(configured)
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    return shutil.which(NAME)


def guest_cmdline(cmdline: str, *, agent_vsock: bool = False) -> str:
    """The kernel command line with the control channel on the virtio console (and the
    agent on vsock)."""
    words = [w for w in cmdline.split() if not w.startswith(("vmfleet.ctl=", "vmfleet.agent="))]
    words.append(f"vmfleet.ctl={CONTROL_DEVICE}")
    if agent_vsock:
        words.append("vmfleet.agent=vsock")
    return " ".join(words)


def agent_endpoint(spec: VmSpec) -> AgentEndpoint | None:
    """The hybrid-vsock socket of the agent's channel (None: a VM made without one)."""
    if not spec.agent_channel:
        return None
    return AgentEndpoint(socket=str(Path(spec.run_dir) / AGENT_SOCKET), vsock_port=AGENT_VSOCK_PORT)


def build_vm_config(spec: VmSpec, *, kernel: Path) -> VmConfig:
    """``vm.create``'s body: a function of the spec (and the extracted kernel) alone."""
    return VmConfig(
        payload=PayloadConfig(
            kernel=str(kernel),
            cmdline=guest_cmdline(spec.cmdline, agent_vsock=spec.agent_channel),
            initramfs=spec.initrd,
        ),
        cpus=CpusConfig(boot_vcpus=spec.vcpus, max_vcpus=spec.vcpus),
        memory=MemoryConfig(size=spec.memory_bytes),
        disks=tuple(_disk(d, spec.disk_io_bps) for d in spec.disks),
        net=tuple(_nic(n) for n in spec.nics),
        serial=ConsoleConfig(mode="File", file=spec.serial_log),
        console=ConsoleConfig(mode="Pty"),
        vsock=(
            VsockConfig(cid=GUEST_CID, socket=str(Path(spec.run_dir) / AGENT_SOCKET))
            if spec.agent_channel
            else None
        ),
    )


def _disk(disk: DiskSpec, disk_io_bps: int = 0) -> DiskConfig:
    return DiskConfig(
        path=disk.path,
        readonly=disk.readonly,
        id=disk.id,
        serial=disk.serial,
        rate_limiter_config=_disk_limiter(disk_io_bps),
    )


def _disk_limiter(disk_io_bps: int) -> RateLimiterConfig | None:
    """hypeman's token bucket: ``disk_io_bps`` a second, and a one-time burst of three
    seconds' worth more (a burst of four times the rate), on each disk of its own."""
    if disk_io_bps <= 0:
        return None
    return RateLimiterConfig(
        bandwidth=TokenBucket(size=disk_io_bps, refill_time=1000, one_time_burst=3 * disk_io_bps)
    )


def _nic(nic: NicSpec) -> NetConfig:
    if nic.mode != "tap" or not nic.tap:
        raise HypervisorError(
            "Cloud Hypervisor has no user-mode networking: use VMFLEET_NETWORK=bridge"
        )
    return NetConfig(tap=nic.tap, mac=nic.mac, id=nic.id)


class _Origin(msgspec.Struct, kw_only=True):
    hypervisor: str
    version: str


class CloudHypervisorDriver:
    name = NAME
    capabilities = Capabilities(snapshot=True, disk_hotplug=True)

    def __init__(
        self,
        *,
        binary: str | None = None,
        api_timeout_s: float = 30.0,
        ready_timeout_s: float = 10.0,
        exit_timeout_s: float = 5.0,
        eject_timeout_s: float = 30.0,
    ) -> None:
        found = binary or find_ch_binary()
        if found is None:
            raise HypervisorError(
                "cloud-hypervisor not found: put it on PATH or set VMFLEET_CH_BINARY"
            )
        self.binary = found
        self.api_timeout_s = api_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.eject_timeout_s = eject_timeout_s

    def api_socket(self, spec: VmSpec) -> Path:
        return Path(spec.run_dir) / API_SOCKET

    def control_socket(self, spec: VmSpec) -> Path:
        return Path(spec.run_dir) / CONTROL_LINK

    def agent_endpoint(self, spec: VmSpec) -> AgentEndpoint | None:
        return agent_endpoint(spec)

    # -- boot, restore -----------------------------------------------------------------------

    async def boot(self, spec: VmSpec, *, vmm_log: Path) -> VmmProcess:
        config = build_vm_config(spec, kernel=await _pvh_kernel(spec))
        _keep_serial_history(Path(spec.serial_log))
        process, _ = await self._start_vmm(spec, vmm_log)
        try:
            async with self._api(spec) as api:
                await api.put("vm.create", config)
                await api.put("vm.boot")
                await self._publish_control_channel(spec, api)
        except BaseException:
            await self._discard(spec, process)
            raise
        return process

    async def restore(self, spec: VmSpec, snapshot_dir: Path, *, vmm_log: Path) -> VmmProcess:
        origin = _read_origin(snapshot_dir)
        _keep_serial_history(Path(spec.serial_log))
        process, version = await self._start_vmm(spec, vmm_log)
        try:
            if version != origin.version:
                raise HypervisorError(
                    f"the snapshot was taken by cloud-hypervisor {origin.version} and this "
                    f"host runs {version}: it can only be restored under {origin.version}"
                )
            async with self._api(spec) as api:
                source = RestoreConfig(source_url=_file_url(snapshot_dir), prefault=False)
                await api.put("vm.restore", source)
                await api.put("vm.resume")
                await self._publish_control_channel(spec, api)
        except BaseException:
            await self._discard(spec, process)
            raise
        return process

    async def restore_swapped(
        self, spec: VmSpec, saved_spec: VmSpec, snapshot_dir: Path, *, vmm_log: Path
    ) -> VmmProcess:
        """CH restores the devices its snapshot's ``config.json`` names: a private copy of
        the snapshot (its big files hard-linked) names the new files, serial log, vsock
        socket and NICs. CH's API has no disk resize, and a restored disk keeps the capacity
        the guest read at boot: a disk of another size is refused."""
        _check_same_disk_sizes(saved_spec, spec)
        source = Path(spec.run_dir) / "restore-source"
        shutil.rmtree(source, ignore_errors=True)
        try:
            _swapped_snapshot_copy(snapshot_dir, source, spec)
            return await self.restore(spec, source, vmm_log=vmm_log)
        finally:
            shutil.rmtree(source, ignore_errors=True)

    async def _start_vmm(self, spec: VmSpec, vmm_log: Path) -> tuple[VmmProcess, str]:
        """A CH process whose API answers; returns it and CH's version."""
        socket = self.api_socket(spec)
        self.control_socket(spec).unlink(missing_ok=True)  # it named the previous VMM's pty
        (Path(spec.run_dir) / AGENT_SOCKET).unlink(missing_ok=True)  # CH binds it anew
        process = await spawn_vmm(
            [self.binary, "--api-socket", str(socket)],
            log_path=vmm_log,
            socket_path=socket,
            ready_timeout_s=self.ready_timeout_s,
        )
        try:
            async with open_ch_api(socket, timeout_s=self.ready_timeout_s) as api:
                version = (await api.ping()).version
        except BaseException:
            await self._discard(spec, process)
            raise
        return process, version

    async def _publish_control_channel(self, spec: VmSpec, api: ChApi) -> None:
        console = (await api.info()).config.console
        if console is None or not console.file:
            raise HypervisorError("cloud-hypervisor reported no pty for the virtio console")
        link = self.control_socket(spec)
        tmp = link.with_name(f".{link.name}.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(console.file)
        tmp.replace(link)

    # -- a running VM ------------------------------------------------------------------------

    async def state(self, spec: VmSpec, process: VmmProcess) -> VmState:
        async with self._api(spec) as api:
            state = (await api.info()).state
        try:
            return VmState(state)
        except ValueError:
            raise HypervisorError(f"cloud-hypervisor reported an unknown state {state!r}") from None

    async def resume(self, spec: VmSpec, process: VmmProcess) -> None:
        async with self._api(spec) as api:
            await api.put("vm.resume")

    async def snapshot(self, spec: VmSpec, process: VmmProcess, snapshot_dir: Path) -> None:
        async with self._api(spec) as api:
            version = (await api.ping()).version
            await api.put("vm.pause")
            try:
                await api.put("vm.snapshot", _snapshot_config(snapshot_dir))
            except BaseException:
                # The state was not saved: the guest goes on running as if nothing happened.
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(5),
                    contextlib.suppress(ChApiError),
                ):
                    await api.put("vm.resume")
                raise
        _stamp_origin(snapshot_dir, version)
        # Past the point of no return: the snapshot is the VM now.
        with anyio.CancelScope(shield=True):
            await self._shut_down_vmm(spec, process)

    async def save_live(
        self,
        spec: VmSpec,
        process: VmmProcess,
        snapshot_dir: Path,
        while_paused: Callable[[], Awaitable[None]],
    ) -> None:
        """As :meth:`snapshot`, but ``vm.resume`` instead of shutting the VMM down."""
        async with self._api(spec) as api:
            version = (await api.ping()).version
            await api.put("vm.pause")
            try:
                await api.put("vm.snapshot", _snapshot_config(snapshot_dir))
                _stamp_origin(snapshot_dir, version)
                await while_paused()
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    await api.put("vm.resume")

    async def power_off(self, spec: VmSpec, process: VmmProcess, timeout_s: float) -> bool:
        """``vm.shutdown`` + ``vmm.shutdown``; True if CH exited within ``timeout_s``. When
        it did not, its socket and pty link are removed all the same: the caller kills it
        next (a killed CH leaves its socket behind)."""
        with contextlib.suppress(ChApiError):
            async with self._api(spec, timeout_s=timeout_s) as api:
                with contextlib.suppress(ChApiError):  # no VM to shut down: still stop CH
                    await api.put("vm.shutdown")
                await api.put("vmm.shutdown")
        exited = await process.wait_for(timeout_s)
        self._forget_files(spec)
        return exited

    async def attach_disk(self, spec: VmSpec, process: VmmProcess, disk: DiskSpec) -> None:
        async with self._api(spec) as api:
            await api.put("vm.add-disk", _disk(disk, spec.disk_io_bps))

    async def detach_disk(self, spec: VmSpec, process: VmmProcess, disk: DiskSpec) -> None:
        async with self._api(spec) as api:
            await api.put("vm.remove-device", VmRemoveDevice(id=disk.id))
            await self._wait_until_ejected(api, disk.id)

    async def _wait_until_ejected(self, api: ChApi, device_id: str) -> None:
        """CH removes a PCI device once the guest has ejected it (ACPI), not at once."""
        try:
            with anyio.fail_after(self.eject_timeout_s):
                # No event to wait for: CH tells nobody when the guest ejects a device.
                while device_id in ((await api.info()).device_tree or {}):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
        except TimeoutError:
            raise HypervisorError(
                f"the guest did not release disk {device_id} within {self.eject_timeout_s:g}s"
            ) from None

    # -- stopping and cleaning up ------------------------------------------------------------

    async def _shut_down_vmm(self, spec: VmSpec, process: VmmProcess) -> None:
        """``vmm.shutdown``, then SIGKILL if CH has not exited in time; reaped on return."""
        with contextlib.suppress(ChApiError):  # CH may exit before it answers
            async with self._api(spec, timeout_s=self.exit_timeout_s) as api:
                await api.put("vmm.shutdown")
        if not await process.wait_for(self.exit_timeout_s):
            await process.kill_and_reap()
        self._forget_files(spec)

    async def _discard(self, spec: VmSpec, process: VmmProcess) -> None:
        """Kill and reap a VMM that failed, and remove what it leaves behind."""
        with anyio.CancelScope(shield=True):
            await process.kill_and_reap()
            self._forget_files(spec)

    def _forget_files(self, spec: VmSpec) -> None:
        self.api_socket(spec).unlink(missing_ok=True)
        self.control_socket(spec).unlink(missing_ok=True)

    @contextlib.asynccontextmanager
    async def _api(self, spec: VmSpec, *, timeout_s: float | None = None) -> AsyncIterator[ChApi]:
        async with open_ch_api(
            self.api_socket(spec), timeout_s=timeout_s or self.api_timeout_s
        ) as api:
            yield api


def _swapped_snapshot_copy(snapshot_dir: Path, target: Path, spec: VmSpec) -> None:
    """``snapshot_dir`` in ``target``: every file hard-linked (copied across filesystems)
    but ``config.json``, rewritten for ``spec``'s files."""
    target.mkdir(parents=True)
    for item in snapshot_dir.iterdir():
        if item.name == "config.json" or not item.is_file():
            continue
        try:
            os.link(item, target / item.name)
        except OSError:
            shutil.copy2(item, target / item.name)
    try:
        config = json.loads((snapshot_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise HypervisorError(f"cannot read the snapshot's config.json: {exc}") from exc
    (target / "config.json").write_text(json.dumps(_swap_config(config, spec)))


def _swap_config(config: dict[str, Any], spec: VmSpec) -> dict[str, Any]:
    """CH's saved VM config with ``spec``'s disk paths, NICs, serial log and vsock socket."""
    disks = {d.id: d for d in spec.disks}
    for disk in config.get("disks") or []:
        new = disks.get(str(disk.get("id")))
        if new is None:
            raise HypervisorError(f"the snapshot's disk {disk.get('id')} has no new file")
        disk["path"] = new.path
    nics = {n.id: n for n in spec.nics}
    for net in config.get("net") or []:
        nic = nics.get(str(net.get("id")))
        if nic is None:
            raise HypervisorError(f"the snapshot's NIC {net.get('id')} has no new one")
        net["mac"], net["tap"] = nic.mac, nic.tap
    if isinstance(config.get("serial"), dict):
        config["serial"]["file"] = spec.serial_log
    if isinstance(config.get("vsock"), dict):
        config["vsock"]["socket"] = str(Path(spec.run_dir) / AGENT_SOCKET)
    return config


def _check_same_disk_sizes(saved: VmSpec, spec: VmSpec) -> None:
    before = {d.id: d for d in saved.disks}
    for disk in spec.disks:
        old = before.get(disk.id)
        if old is None or not Path(old.path).exists():
            continue  # the saved file is gone (a fork's source): its copy has its size
        if disk_virtual_size(disk) != disk_virtual_size(old):
            raise HypervisorError(
                f"Cloud Hypervisor cannot give a restored VM's disk {disk.id} another size "
                f"({disk_virtual_size(old)} -> {disk_virtual_size(disk)} bytes)"
            )


def disk_virtual_size(disk: DiskSpec) -> int:
    """The size the guest sees: a raw file's length, a qcow2's virtual size (its header)."""
    path = Path(disk.path)
    if disk.format != "qcow2":
        return path.stat().st_size
    with path.open("rb") as f:
        header = f.read(32)
    return int.from_bytes(header[24:32], "big")


async def _pvh_kernel(spec: VmSpec) -> Path:
    try:
        return await ensure_vmlinux(Path(spec.kernel))
    except (GuestAssetError, OSError) as exc:
        raise HypervisorError(f"no kernel Cloud Hypervisor can boot: {exc}") from exc


def _keep_serial_history(serial_log: Path) -> None:
    """CH truncates its serial file on open: keep what the previous VMM wrote."""
    with contextlib.suppress(FileNotFoundError):
        if serial_log.stat().st_size > 0:
            serial_log.replace(serial_log.with_name(serial_log.name + ".1"))


def _snapshot_config(snapshot_dir: Path) -> VmSnapshotConfig:
    return VmSnapshotConfig(destination_url=_file_url(snapshot_dir))


def _stamp_origin(snapshot_dir: Path, version: str) -> None:
    """Which CH wrote the snapshot: a restore under another version is refused."""
    write_atomic(
        snapshot_dir / ORIGIN_FILE,
        msgspec.json.encode(_Origin(hypervisor=NAME, version=version)),
    )


def _file_url(path: Path) -> str:
    return f"file://{os.path.abspath(path)}"


def _read_origin(snapshot_dir: Path) -> _Origin:
    try:
        origin = msgspec.json.decode((snapshot_dir / ORIGIN_FILE).read_bytes(), type=_Origin)
    except (OSError, msgspec.DecodeError) as exc:
        raise HypervisorError(
            f"{snapshot_dir} holds no Cloud Hypervisor snapshot ({ORIGIN_FILE}: {exc})"
        ) from exc
    if origin.hypervisor != NAME:
        raise HypervisorError(f"the snapshot was taken by {origin.hypervisor}, not {NAME}")
    return origin
