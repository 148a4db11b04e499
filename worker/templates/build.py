"""Building one warm template: boot a VM of the shape on empty placeholder disks up to the
point where its init waits for its instance config, save it, and publish it complete.

The VM has the devices an instance of the shape has (the three boot disks by the same ids
and serials, the NIC, the agent's port, the hot-plug root ports) and nothing of any
instance: its disks are empty files and it never reads them. Its init is told
``vmfleet.wait=1``; the host waits for ``status`` to say ``waiting`` and saves it there.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import anyio
import msgspec

from schemas.errors import HypervisorError
from worker.drivers.base import DiskSpec, Hypervisor, NicSpec, VmSpec
from worker.guest.control import GuestControlError, guest_request
from worker.lifecycle.boot import CMDLINE
from worker.lifecycle.context import BootAssets
from worker.proc import VmmProcess
from worker.storage import write_atomic
from worker.templates.store import (
    HostIdentity,
    TemplateManifest,
    TemplateShape,
    TemplateStore,
    directory_bytes,
    template_key,
)

__all__ = ["TEMPLATE_CMDLINE", "TemplateBuildError", "build_template", "template_spec"]

log = logging.getLogger(__name__)

#: The init waits for its instance before it touches a disk (worker/guest/init.sh).
TEMPLATE_CMDLINE = f"{CMDLINE} vmfleet.wait=1"
#: Every resumed instance is given its own MAC at once; this one never reaches a network.
TEMPLATE_MAC = "02:00:00:00:00:01"
#: The boot disks as worker.lifecycle.boot.vm_spec names them: (id, read-only).
BOOT_DISKS = (("root", True), ("overlay", False), ("config", True))
PLACEHOLDER_BYTES = 1 << 20


class TemplateBuildError(HypervisorError):
    """A template could not be built (cold boots go on as before)."""


def template_spec(
    shape: TemplateShape, boot: BootAssets, hypervisor: str, directory: Path
) -> VmSpec:
    disks = tuple(
        DiskSpec(
            id=disk_id,
            path=str(directory / f"disk-{disk_id}.img"),
            readonly=readonly,
            serial=f"vmfleet-{disk_id}",
        )
        for disk_id, readonly in BOOT_DISKS
    )
    # A user-mode NIC: no TAP to make, and the backend is not part of the saved state.
    nics = (NicSpec(id="net0", mac=TEMPLATE_MAC, mode="user"),) if shape.network else ()
    return VmSpec(
        instance_id="template",
        vcpus=shape.vcpus,
        memory_bytes=shape.memory_bytes,
        kernel=str(boot.kernel),
        initrd=str(boot.initrd),
        cmdline=TEMPLATE_CMDLINE,
        disks=disks,
        serial_log=str(directory / "console.log"),
        run_dir=str(directory / "run"),
        accel=boot.accel,
        nics=nics,
        hypervisor=hypervisor,
        agent_channel=shape.agent_channel,
    )


async def build_template(
    store: TemplateStore,
    driver: Hypervisor,
    boot: BootAssets,
    shape: TemplateShape,
    host: HostIdentity,
    *,
    wait_timeout_s: float = 180.0,
) -> TemplateManifest:
    """Build and publish the template of ``shape``; on failure nothing is left behind."""
    key = template_key(shape, host)
    started = time.monotonic()
    build = store.build_dir(key)
    process: VmmProcess | None = None
    try:
        spec = template_spec(shape, boot, driver.name, build)
        _make_placeholders(spec)
        Path(spec.run_dir).mkdir()
        process = await driver.boot(spec, vmm_log=build / "vmm.log")
        await _wait_until_waiting(driver, spec, process, wait_timeout_s)
        await _zero_free_memory(driver, spec)
        await driver.snapshot(spec, process, build)  # saved; the VMM is gone on return
        process = None
        write_atomic(build / "vm.json", msgspec.json.encode(spec))
        shutil.rmtree(spec.run_dir, ignore_errors=True)
        manifest = TemplateManifest(
            key=key,
            shape=shape,
            host=host,
            built_at=time.time(),
            build_seconds=round(time.monotonic() - started, 3),
            size_bytes=directory_bytes(build),
        )
        store.publish(build, manifest)
        return manifest
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            if process is not None:
                await process.kill_and_reap()
            shutil.rmtree(build, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, TemplateBuildError):
            raise TemplateBuildError(f"template {key} not built: {exc}") from exc
        raise


async def _zero_free_memory(driver: Hypervisor, spec: VmSpec) -> None:
    """Free guest memory still holds what the kernel freed (init sections, the initrd's
    archive); zeroed, it is left out of the saved state: a smaller template loads faster
    on every resume. Only an optimization: a guest that cannot do it is saved as it is."""
    try:
        await guest_request(driver.control_socket(spec), "zerofree", timeout_s=60)
    except GuestControlError as exc:
        log.warning("template VM could not zero its free memory: %s", exc)


def _make_placeholders(spec: VmSpec) -> None:
    for disk in spec.disks:
        with open(disk.path, "wb") as f:
            os.ftruncate(f.fileno(), PLACEHOLDER_BYTES)


async def _wait_until_waiting(
    driver: Hypervisor, spec: VmSpec, process: VmmProcess, timeout_s: float
) -> None:
    """Until the init says it waits for its config; a VMM that exits first is a failure."""
    control = driver.control_socket(spec)
    with anyio.move_on_after(timeout_s):
        while process.running():
            try:
                status = await guest_request(control, "status", timeout_s=10)
            except GuestControlError:
                status = ""
            if status == "waiting":
                return
            if status.startswith("failed"):
                raise TemplateBuildError(f"the template's init failed: {status}")
            await anyio.sleep(0.2)
        raise TemplateBuildError(
            f"the template VM exited while booting (status {process.returncode})"
        )
    raise TemplateBuildError(f"the template's init did not wait for its config in {timeout_s:g}s")
