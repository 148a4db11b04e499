"""create: pull the image if needed, make the instance's disks, boot it."""

from __future__ import annotations

import anyio

from schemas.api import MAX_VCPUS, Hypervisor
from schemas.clock import utc_now
from schemas.errors import BadRequest, HypervisorError
from schemas.messages import Create, InstanceRecord
from worker.capacity import CapacityAccount
from worker.guest.initrd import OVERLAY_ROOT_DIRS
from worker.images import ImageInfo
from worker.lifecycle.boot import boot_to_running, run_until_ready
from worker.lifecycle.context import LocalInstance, OpContext
from worker.lifecycle.mounts import check_mounts
from worker.lifecycle.network import check_network_limits, release_network, take_address, unplug
from worker.lifecycle.phases import CreatePhases
from worker.network import USER_GUEST_IP, check_port_mappings, claim_host_ports, mac_for
from worker.states import Op
from worker.storage import make_sparse_ext4
from worker.templates.start import resume_from_template, template_shape

__all__ = ["check_create", "create", "initial_record", "publish_address"]


async def create(ctx: OpContext, cmd: Create, capacity: CapacityAccount) -> LocalInstance:
    """Make and boot the instance; on return the caller puts it in its table at once (the
    host's share it takes stops counting as a create under way then)."""
    # 1. Refuse what cannot work before anything is made, then hold the host's share.
    check_create(ctx, cmd, capacity)
    with capacity.reserving(cmd):
        return await _make(ctx, cmd)


def check_create(ctx: OpContext, cmd: Create, capacity: CapacityAccount) -> None:
    """Every check of a create, in one place: the request, its mounts, ports and network
    limits, the room left on the host (503 ``host_full``), the host ports still free, and
    the volumes it names. No await: nothing can take the room or the ports meanwhile."""
    _check_request(cmd)
    check_mounts(cmd.volumes)
    check_port_mappings(cmd.port_mappings)
    check_network_limits(ctx, cmd)
    capacity.check_room_for(cmd)
    claim_host_ports(cmd.port_mappings, capacity.ports_taken(), publish_address(ctx))
    for mount in cmd.volumes:
        ctx.volumes.require(mount.volume_id)


async def _make(ctx: OpContext, cmd: Create) -> LocalInstance:
    # 2. The instance's directory and record: from here on, a failure removes both.
    guest = ctx.storage.create_guest(cmd.instance_id)
    inst = LocalInstance(record=initial_record(ctx, cmd), guest=guest)
    walk = ctx.walk(inst, Op.CREATE)  # from Created, the state of its first record
    attached: list[str] = []
    try:
        guest.write(guest.metadata, inst.record)
        ctx.oplog(inst, "creating instance", name=cmd.name, image=cmd.image)
        phases = CreatePhases()
        # 3. The image, pulled on demand.
        with phases.timing("pull"):
            image = await ctx.pull_image(inst)
        ctx.save(inst, image_digest=image.digest)
        with phases.timing("disks"):
            # 4. Volumes: record the attachments (hypeman's sharing rules are checked here).
            for mount in cmd.volumes:
                ctx.volumes.attach(mount.volume_id, inst.id, mount.mount_path, mount.readonly)
                attached.append(mount.volume_id)
            # 5. bridge mode: an address (IP + MAC) and a TAP name.
            take_address(ctx, inst)
            # 6. The writable overlay, then boot.
            await make_sparse_ext4(guest.overlay, cmd.overlay_bytes, dirs=OVERLAY_ROOT_DIRS)
        if await _resumed_from_template(ctx, inst, image, phases):
            await run_until_ready(ctx, walk, phases)
        else:
            await boot_to_running(ctx, walk, image, phases)
        _report_phases(ctx, inst, phases)
        ctx.oplog(inst, "instance created", name=cmd.name, state=inst.state.value)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _undo(ctx, inst, attached)
        raise
    return inst


async def _resumed_from_template(
    ctx: OpContext, inst: LocalInstance, image: ImageInfo, phases: CreatePhases
) -> bool:
    """A warm start when the host has a template of the instance's shape; False: boot cold
    (no template, or the resume failed: the cold boot still works, and says why not)."""
    templates = ctx.templates
    shape = template_shape(ctx, inst)
    if templates is None or shape is None:
        return False
    template = templates.ready_for(shape)  # none yet: it asks for one, for the next create
    if template is None:
        return False
    try:
        await resume_from_template(ctx, inst, image, template, phases)
    except HypervisorError as exc:
        ctx.oplog(inst, "warm template start failed; booting cold", level="WARN", error=exc)
        inst.process = None  # resume killed and reaped it
        inst.guest.write_pid(None)
        await unplug(ctx, inst)
        return False
    return True


def _report_phases(ctx: OpContext, inst: LocalInstance, phases: CreatePhases) -> None:
    """Where the create's time went: one ops log line, and the worker's histograms."""
    ctx.oplog(inst, f"create phases {phases.summary()}")
    for phase, seconds in phases.seconds.items():
        ctx.observe_create_phase(phase, seconds)


def publish_address(ctx: OpContext) -> str:
    """Where a mapped host port must be free: bridge mode's DNAT takes every local address."""
    return "0.0.0.0" if ctx.bridge is not None else ctx.network.publish_addr


def _check_request(cmd: Create) -> None:
    if not 1 <= cmd.vcpus <= MAX_VCPUS:
        raise BadRequest(f"vcpus must be between 1 and {MAX_VCPUS}", code="invalid_vcpus")
    if cmd.size_bytes < 64 << 20:
        raise BadRequest("size must be at least 64MB", code="invalid_size")
    if cmd.overlay_bytes < 16 << 20:
        raise BadRequest("overlay_size must be at least 16MB", code="invalid_overlay_size")


def initial_record(ctx: OpContext, cmd: Create) -> InstanceRecord:
    """A new instance's first record (a fork's too)."""
    user_mode = cmd.network_enabled and ctx.bridge is None
    return cmd.new_record(
        host=ctx.host_id,
        hypervisor=Hypervisor(ctx.driver.name),
        created_at=utc_now(),
        # bridge mode: set from the lease, before boot.
        ip=USER_GUEST_IP if user_mode else None,
        mac=mac_for(cmd.instance_id) if user_mode else None,
    )


async def _undo(ctx: OpContext, inst: LocalInstance, attached: list[str]) -> None:
    if inst.process is not None:
        await inst.process.kill_and_reap()
    # Each undo step goes on after a failed one, and says what it could not undo.
    for volume_id in attached:
        try:
            ctx.volumes.detach(volume_id, inst.id)
        except Exception as exc:
            ctx.oplog(
                inst, "create undo: volume not released", level="ERROR", volume=volume_id, error=exc
            )
    try:
        await release_network(ctx, inst, record=False)
    except Exception as exc:
        ctx.oplog(inst, "create undo: network not released", level="ERROR", error=exc)
    ctx.storage.remove_guest(inst.id)
    ctx.on_removed(inst.record)
