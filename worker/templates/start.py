"""A create's warm start: the instance's VM resumed from its shape's template.

The instance's disks (image, overlay, config) and NIC go under the template's saved VM
(worker/resume.py), the guest is told its identity, and its init goes on from mounting its
disks exactly as after a cold boot: the config disk gives it its hostname, network and app.
From there the create is a cold boot's (Initializing, then Running once the agent answers),
and the instance is an ordinary one: its vm.json is the device model it runs with, so
standby/restore, stop/start (a cold boot), hot attach and exec work as for any other.
"""

from __future__ import annotations

from schemas.api import Hypervisor
from worker.guest import build_config_disk
from worker.images import ImageInfo
from worker.lifecycle.boot import guest_config
from worker.lifecycle.context import LocalInstance, OpContext
from worker.lifecycle.network import nics, plug
from worker.lifecycle.phases import CreatePhases
from worker.resume import GuestIdentity, resume_saved_vm, swap_spec
from worker.templates.store import Template, TemplateShape

__all__ = ["resume_from_template", "template_shape"]


def template_shape(ctx: OpContext, inst: LocalInstance) -> TemplateShape | None:
    """The template an instance could start from; None when it must boot cold: volumes at
    create (their disks are not in a template's device model), or another hypervisor than
    QEMU (Cloud Hypervisor cannot give a restored disk another size)."""
    record = inst.record
    if record.volumes or record.hypervisor != Hypervisor.QEMU or ctx.driver.name != "qemu":
        return None
    return TemplateShape(
        memory_bytes=record.size_bytes + record.hotplug_bytes,
        vcpus=record.vcpus,
        network=record.network_enabled,
    )


async def resume_from_template(
    ctx: OpContext,
    inst: LocalInstance,
    image: ImageInfo,
    template: Template,
    phases: CreatePhases,
) -> None:
    """Start the instance's VMM from ``template``; on return its guest boots on from its
    config. On failure no VMM is left (the caller may boot cold)."""
    guest = inst.guest
    with phases.timing("disks"):
        config = guest_config(ctx, inst, image, [])
        await build_config_disk(guest.config_disk, config, agent=ctx.boot.agent)
    spec = swap_spec(
        template.saved.spec,
        instance_id=inst.id,
        run_dir=str(guest.run_dir),
        serial_log=str(guest.app_log),
        disks={
            "root": str(image.disk),
            "overlay": str(guest.overlay),
            "config": str(guest.config_disk),
        },
        nics=nics(ctx, inst),
        disk_io_bps=inst.record.disk_io_bps,
    )
    guest.write(guest.vm_spec, spec)
    inst.app_status = None
    identity = GuestIdentity(
        hostname=inst.record.name,
        mac=spec.nics[0].mac if spec.nics else None,
        network=config.network,
    )
    with phases.timing("template"):
        await plug(ctx, inst)
        inst.process = await resume_saved_vm(
            ctx.driver, template.saved, spec, identity, vmm_log=guest.vmm_log
        )
    inst.spec = spec
    guest.write_pid(inst.process.pid)
    ctx.oplog(
        inst,
        "VMM started from a warm template",
        template=template.manifest.key,
        pid=inst.process.pid,
    )
