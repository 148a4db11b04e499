"""QEMU driver: one ``qemu-system-x86_64`` per VM, driven over QMP.

Decisions (What / Why):
- q35 with ``pcie-root-port``s reserved for hot-plug: a disk cannot be hot-plugged on
  ``pcie.0``. Boot disks sit on ``pcie.0``; every volume sits on a root port, so a
  restore can recreate exactly the device tree a snapshot was taken with.
- The serial console is a ``file`` chardev with ``append=on``: ``-serial file:`` truncates,
  which would lose the app's log history on every start and restore.
- The guest control channel is a second 8250 serial port on a unix socket (ttyS1 in the
  guest); virtio-serial did not work with a shell reader in the guest on these machines.
- The guest agent's channel is a virtio-serial port named ``vmfleet.agent`` on a unix
  socket (``agent.sock``): no vhost-vsock on these hosts, and it never touches the guest
  network. Only for specs with ``agent_channel`` (older snapshots have no such device).
- Snapshots use ``migrate exec:cat > FILE`` (QEMU 7.2 has no ``file:`` URI) with the
  bandwidth cap lifted, and restores use ``-incoming defer`` + ``migrate-incoming``.
- ``-no-reboot``: a guest that reboots or powers off ends the QEMU process, so a stopped
  guest is never left running a VMM.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from schemas.errors import HypervisorError
from worker.drivers.base import AgentEndpoint, Capabilities, DiskSpec, NicSpec, VmSpec, VmState
from worker.drivers.qmp import QmpClient, QmpError, open_qmp
from worker.proc import VmmProcess, spawn_vmm

__all__ = ["QemuDriver", "agent_endpoint", "build_args", "qemu_binary"]

_STATUS_TO_STATE = {
    "running": VmState.RUNNING,
    "paused": VmState.PAUSED,
    "prelaunch": VmState.CREATED,
    "inmigrate": VmState.PAUSED,
    "postmigrate": VmState.PAUSED,
    "finish-migrate": VmState.PAUSED,
    "suspended": VmState.PAUSED,
    "shutdown": VmState.SHUTDOWN,
}

QMP_SOCKET = "qmp.sock"
CONTROL_SOCKET = "ctl.sock"
AGENT_SOCKET = "agent.sock"
AGENT_PORT_NAME = "vmfleet.agent"


def qemu_binary() -> str:
    found = shutil.which("qemu-system-x86_64")
    if found is None:
        raise HypervisorError("qemu-system-x86_64 not found: install Debian's qemu-system-x86")
    return found


def build_args(spec: VmSpec, *, binary: str, incoming: bool = False) -> list[str]:
    """The whole command line; a function of the spec alone, so restore can rebuild it."""
    run = Path(spec.run_dir)
    accel = [
        "-machine",
        f"q35,accel={spec.accel}",
        "-cpu",
        "host" if spec.accel == "kvm" else "max",
    ]
    args = [
        binary,
        "-name",
        f"vmfleet-{spec.instance_id}",
        *accel,
        "-smp",
        str(spec.vcpus),
        "-m",
        f"{spec.memory_bytes // (1024 * 1024)}M",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        spec.kernel,
        "-initrd",
        spec.initrd,
        "-append",
        spec.cmdline,
        *_firmware(),
        "-chardev",
        f"socket,id=qmp,path={run / QMP_SOCKET},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"file,id=console,path={spec.serial_log},append=on",
        "-serial",
        "chardev:console",
        "-chardev",
        f"socket,id=ctl,path={run / CONTROL_SOCKET},server=on,wait=off",
        "-serial",
        "chardev:ctl",
    ]
    if spec.agent_channel:
        args += _agent_args(run / AGENT_SOCKET)
    for slot in range(1, spec.hotplug_slots + 1):
        args += ["-device", f"pcie-root-port,id=rp{slot},slot={slot},chassis={slot}"]
    for disk in spec.disks:
        args += _disk_args(disk, spec.disk_io_bps)
    for nic in spec.nics:
        args += _nic_args(nic)
    if incoming:
        args += ["-incoming", "defer"]
    return args


def agent_endpoint(spec: VmSpec) -> AgentEndpoint | None:
    """The host end of the agent's virtio-serial port (None: a VM made without one)."""
    if not spec.agent_channel:
        return None
    return AgentEndpoint(socket=str(Path(spec.run_dir) / AGENT_SOCKET))


def _agent_args(socket: Path) -> list[str]:
    return [
        "-device",
        "virtio-serial-pci,id=vser",
        "-chardev",
        f"socket,id=agent,path={socket},server=on,wait=off",
        "-device",
        f"virtserialport,bus=vser.0,chardev=agent,name={AGENT_PORT_NAME}",
    ]


def _firmware() -> list[str]:
    """qboot when QEMU ships it: it boots the kernel directly, faster than SeaBIOS, and
    prints nothing, so the app's console log starts with the guest's own lines."""
    qboot = Path("/usr/share/qemu/qboot.rom")
    return ["-bios", str(qboot)] if qboot.exists() else []


def _nic_args(nic: NicSpec) -> list[str]:
    if nic.mode == "tap":
        netdev = f"tap,id={nic.id},ifname={nic.tap},script=no,downscript=no"
    else:
        forwards = "".join(
            f",hostfwd={f.protocol}:{f.host_addr}:{f.host_port}-:{f.guest_port}"
            for f in nic.forwards
        )
        netdev = f"user,id={nic.id}{forwards}"
    return ["-netdev", netdev, "-device", f"virtio-net-pci,netdev={nic.id},mac={nic.mac}"]


def _disk_args(disk: DiskSpec, disk_io_bps: int = 0) -> list[str]:
    """file -> raw (-> throttle, when the instance has ``disk_io_bps``) -> virtio-blk.
    The device always names ``disk.id``: the top node, whichever it is."""
    readonly = ",read-only=on" if disk.readonly else ""
    device = f"virtio-blk-pci,drive={disk.id},id=dev-{disk.id},serial={disk.serial}"
    if disk.slot is not None:
        device += f",bus=rp{disk.slot}"
    raw = _raw_node(disk, disk_io_bps)
    args = [
        "-blockdev",
        f"driver=file,filename={disk.path},node-name=file-{disk.id}{readonly}",
        "-blockdev",
        f"driver={disk.format},file=file-{disk.id},node-name={raw}{readonly}",
    ]
    if disk_io_bps > 0:
        group = json.dumps(_throttle_group(disk, disk_io_bps), separators=(",", ":"))
        args += [
            "-object",
            group,
            "-blockdev",
            f"driver=throttle,throttle-group={_group_id(disk)},file={raw},"
            f"node-name={disk.id}{readonly}",
        ]
    return [*args, "-device", device]


#: hypeman's burst: four times the rate, for one second.
DISK_BURST_FACTOR = 4


def _raw_node(disk: DiskSpec, disk_io_bps: int) -> str:
    return f"raw-{disk.id}" if disk_io_bps > 0 else disk.id


def _group_id(disk: DiskSpec) -> str:
    return f"tg-{disk.id}"


def _throttle_group(disk: DiskSpec, disk_io_bps: int) -> dict[str, object]:
    """One throttle group per disk, as hypeman gives each disk its own limiter. The JSON form
    of ``-object``: QEMU 7.2's key=value form refuses ``limits.bps-total-max-length``."""
    return {
        "qom-type": "throttle-group",
        "id": _group_id(disk),
        "limits": {
            "bps-total": disk_io_bps,
            "bps-total-max": disk_io_bps * DISK_BURST_FACTOR,
            "bps-total-max-length": 1,
        },
    }


class QemuDriver:
    name = "qemu"
    capabilities = Capabilities(snapshot=True, disk_hotplug=True)

    def __init__(self, *, binary: str | None = None, migrate_timeout_s: float = 60.0) -> None:
        self.binary = binary or qemu_binary()
        self.migrate_timeout_s = migrate_timeout_s

    def api_socket(self, spec: VmSpec) -> Path:
        return Path(spec.run_dir) / QMP_SOCKET

    def control_socket(self, spec: VmSpec) -> Path:
        return Path(spec.run_dir) / CONTROL_SOCKET

    def agent_endpoint(self, spec: VmSpec) -> AgentEndpoint | None:
        return agent_endpoint(spec)

    async def boot(self, spec: VmSpec, *, vmm_log: Path) -> VmmProcess:
        return await spawn_vmm(
            build_args(spec, binary=self.binary),
            log_path=vmm_log,
            socket_path=self.api_socket(spec),
        )

    async def state(self, spec: VmSpec, process: VmmProcess) -> VmState:
        async with open_qmp(self.api_socket(spec)) as qmp:
            status = await qmp.execute("query-status")
        return _STATUS_TO_STATE.get(str(status.get("status")), VmState.RUNNING)

    async def snapshot(self, spec: VmSpec, process: VmmProcess, snapshot_dir: Path) -> None:
        memory = snapshot_dir / "memory"
        async with open_qmp(self.api_socket(spec)) as qmp:
            await qmp.execute("stop")
            try:
                await self._save_memory(qmp, memory)
            except BaseException:
                # The state was not saved: the guest goes on running as if nothing happened
                # (unless QEMU itself is gone; then the original error is the one to report).
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(5),
                    contextlib.suppress(QmpError),
                ):
                    await qmp.execute("cont")
                raise
            await qmp.execute("quit")
        if not await process.wait_for(10):
            await process.kill_and_reap()

    async def save_live(
        self,
        spec: VmSpec,
        process: VmmProcess,
        snapshot_dir: Path,
        while_paused: Callable[[], Awaitable[None]],
    ) -> None:
        """As :meth:`snapshot`, but ``cont`` instead of ``quit``: QEMU reactivates the disks
        a finished migration let go of, and the guest goes on."""
        memory = snapshot_dir / "memory"
        async with open_qmp(self.api_socket(spec)) as qmp:
            await qmp.execute("stop")
            try:
                await self._save_memory(qmp, memory)
                await while_paused()
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    await qmp.execute("cont")

    async def _save_memory(self, qmp: QmpClient, memory: Path) -> None:
        """The paused VM's state into ``memory``, with the migration bandwidth cap lifted."""
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        await qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(memory))}"})
        await self._wait_for_migration(qmp)

    async def _wait_for_migration(self, qmp: QmpClient) -> None:
        with anyio.fail_after(self.migrate_timeout_s):
            while True:
                info = await qmp.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    raise HypervisorError(f"snapshot failed: {info.get('error-desc', status)}")
                await anyio.sleep(0.02)

    async def restore(self, spec: VmSpec, snapshot_dir: Path, *, vmm_log: Path) -> VmmProcess:
        return await self._restore(spec, snapshot_dir, vmm_log=vmm_log)

    async def restore_swapped(
        self, spec: VmSpec, saved_spec: VmSpec, snapshot_dir: Path, *, vmm_log: Path
    ) -> VmmProcess:
        """The saved guest on other files: the migration stream holds no disk contents, so
        the new command line's drives are what the guest reads from now on. The stream does
        hold each disk's capacity as the guest last read it; a resize while paused makes the
        guest read it again (a config-change interrupt on ``cont``)."""

        async def fit_disks(qmp: QmpClient) -> None:
            await _fit_disk_sizes(qmp, spec)

        return await self._restore(spec, snapshot_dir, vmm_log=vmm_log, while_paused=fit_disks)

    async def _restore(
        self,
        spec: VmSpec,
        snapshot_dir: Path,
        *,
        vmm_log: Path,
        while_paused: Callable[[QmpClient], Awaitable[None]] | None = None,
    ) -> VmmProcess:
        memory = snapshot_dir / "memory"
        _check_readable(memory)
        process = await spawn_vmm(
            build_args(spec, binary=self.binary, incoming=True),
            log_path=vmm_log,
            socket_path=self.api_socket(spec),
        )
        try:
            async with open_qmp(self.api_socket(spec)) as qmp:
                await qmp.execute(
                    "migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(memory))}"}
                )
                await self._wait_until_loaded(qmp, process)
                if while_paused is not None:
                    await while_paused(qmp)
                await qmp.execute("cont")
        except BaseException:
            await process.kill_and_reap()
            raise
        return process

    async def _wait_until_loaded(self, qmp: QmpClient, process: VmmProcess) -> None:
        """Until the saved VM is loaded. QEMU exits on a stream it cannot load (a torn
        memory file); it would wait forever for one ``cat`` could not open, hence the check
        before the spawn."""
        with anyio.fail_after(self.migrate_timeout_s):
            while True:
                status = (await qmp.execute("query-status")).get("status")
                if status in ("paused", "postmigrate", "running"):
                    return
                if status in ("guest-panicked", "internal-error", "io-error", "shutdown"):
                    raise HypervisorError(f"restore failed: the VM is {status}")
                if not process.running():
                    raise HypervisorError("restore failed: the VMM exited while loading")
                # Short: a restore is on a wake's path (a query costs well under 1 ms).
                await anyio.sleep(0.002)

    async def resume(self, spec: VmSpec, process: VmmProcess) -> None:
        async with open_qmp(self.api_socket(spec)) as qmp:
            await qmp.execute("cont")

    async def power_off(self, spec: VmSpec, process: VmmProcess, timeout_s: float) -> bool:
        try:
            async with open_qmp(self.api_socket(spec)) as qmp:
                await qmp.execute("system_powerdown")
        except QmpError:
            return not process.running()
        return await process.wait_for(timeout_s)

    async def quit(self, spec: VmSpec, process: VmmProcess) -> None:
        """Stop the VMM at once (no guest shutdown); reaped on return."""
        try:
            async with open_qmp(self.api_socket(spec), timeout_s=2) as qmp:
                await qmp.execute("quit")
        except QmpError:
            pass
        if not await process.wait_for(5):
            await process.kill_and_reap()

    async def attach_disk(self, spec: VmSpec, process: VmmProcess, disk: DiskSpec) -> None:
        assert disk.slot is not None, "hot-plugged disks sit on a root port"
        async with open_qmp(self.api_socket(spec)) as qmp:
            added: list[tuple[str, dict[str, object]]] = []  # what to undo, newest last
            try:
                for command, arguments, undo in _hotplug_steps(disk, spec.disk_io_bps):
                    await qmp.execute(command, arguments)
                    added.append(undo)
                await qmp.execute(
                    "device_add",
                    {
                        "driver": "virtio-blk-pci",
                        "drive": disk.id,
                        "id": f"dev-{disk.id}",
                        "serial": disk.serial,
                        "bus": f"rp{disk.slot}",
                    },
                )
            except QmpError:
                for command, arguments in reversed(added):
                    with contextlib.suppress(QmpError):
                        await qmp.execute(command, arguments)
                raise

    async def detach_disk(self, spec: VmSpec, process: VmmProcess, disk: DiskSpec) -> None:
        async with open_qmp(self.api_socket(spec)) as qmp:
            try:
                await qmp.execute("device_del", {"id": f"dev-{disk.id}"})
            except QmpError as exc:
                # Gone already: an earlier unplug, cut short by its bound, finished since.
                if "not found" not in str(exc):
                    raise
            else:
                await qmp.wait_event(
                    "DEVICE_DELETED",
                    timeout_s=30,
                    match=lambda data: data.get("device") == f"dev-{disk.id}",
                )
            for _, _, (command, arguments) in reversed(_hotplug_steps(disk, spec.disk_io_bps)):
                await qmp.execute(command, arguments)


async def _fit_disk_sizes(qmp: QmpClient, spec: VmSpec) -> None:
    """``block_resize`` each disk to its own file's size (the file is left as it is). QEMU
    refuses to resize a read-only node, so a read-only disk's nodes are reopened writable
    for that one command and read-only again; the VM is paused meanwhile, so the guest
    never has a writable disk."""
    sizes = await _virtual_sizes(qmp)
    for disk in spec.disks:
        size = sizes.get(_raw_node(disk, spec.disk_io_bps))
        if size is None:
            raise HypervisorError(f"QEMU reports no size for disk {disk.id}")
        if disk.readonly:
            await qmp.execute("blockdev-reopen", {"options": _reopen_chain(disk, spec, False)})
        await qmp.execute("block_resize", {"node-name": disk.id, "size": size})
        if disk.readonly:
            await qmp.execute("blockdev-reopen", {"options": _reopen_chain(disk, spec, True)})


async def _virtual_sizes(qmp: QmpClient) -> dict[str, int]:
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    sizes: dict[str, int] = {}
    for node in nodes if isinstance(nodes, list) else []:
        image = node.get("image") or {}
        if "node-name" in node and "virtual-size" in image:
            sizes[str(node["node-name"])] = int(image["virtual-size"])
    return sizes


def _reopen_chain(disk: DiskSpec, spec: VmSpec, readonly: bool) -> list[dict[str, object]]:
    """The options of every node of a disk, as :func:`_disk_args` made them, with
    ``read-only`` set (blockdev-reopen resets what it is not given)."""
    raw = _raw_node(disk, spec.disk_io_bps)
    chain: list[dict[str, object]] = [
        {"driver": disk.format, "node-name": raw, "file": f"file-{disk.id}", "read-only": readonly},
        {
            "driver": "file",
            "node-name": f"file-{disk.id}",
            "filename": disk.path,
            "read-only": readonly,
        },
    ]
    if spec.disk_io_bps > 0:
        throttle: dict[str, object] = {
            "driver": "throttle",
            "node-name": disk.id,
            "throttle-group": _group_id(disk),
            "file": raw,
            "read-only": readonly,
        }
        chain.insert(0, throttle)
    return chain


Step = tuple[str, dict[str, object], tuple[str, dict[str, object]]]


def _check_readable(memory: Path) -> None:
    try:
        with memory.open("rb") as saved:
            if not saved.read(1):
                raise HypervisorError(f"restore failed: the saved memory {memory} is empty")
    except OSError as exc:
        raise HypervisorError(f"restore failed: cannot read the saved memory: {exc}") from exc


def _hotplug_steps(disk: DiskSpec, disk_io_bps: int) -> list[Step]:
    """The QMP commands that build a disk's node stack (as :func:`_disk_args` does on the
    command line), each with the command that takes it away again."""
    raw = _raw_node(disk, disk_io_bps)
    steps: list[Step] = [
        (
            "blockdev-add",
            {
                "driver": "file",
                "filename": disk.path,
                "node-name": f"file-{disk.id}",
                "read-only": disk.readonly,
            },
            ("blockdev-del", {"node-name": f"file-{disk.id}"}),
        ),
        (
            "blockdev-add",
            {
                "driver": disk.format,
                "file": f"file-{disk.id}",
                "node-name": raw,
                "read-only": disk.readonly,
            },
            ("blockdev-del", {"node-name": raw}),
        ),
    ]
    if disk_io_bps > 0:
        steps += [
            (
                "object-add",
                _throttle_group(disk, disk_io_bps),
                ("object-del", {"id": _group_id(disk)}),
            ),
            (
                "blockdev-add",
                {
                    "driver": "throttle",
                    "throttle-group": _group_id(disk),
                    "file": raw,
                    "node-name": disk.id,
                    "read-only": disk.readonly,
                },
                ("blockdev-del", {"node-name": disk.id}),
            ),
        ]
    return steps
