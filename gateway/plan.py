"""Planning a create: hypeman's handler-level checks, then the Create command and where it
may run.

What hypeman's handlers check (size strings, limits, image readiness) gets the handler's
specific code: ``invalid_size``, ``invalid_hotplug_size``, ``image_not_ready``, ... Unlike
``gateway.requests`` this reads the fleet view (images, volumes and their hosts).

Sizes are parsed here, once: a command carries bytes, and a worker never parses a size
string. Mount paths are the worker's to check (it owns hypeman's list of forbidden roots);
its 400 comes back through the command result before anything is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import msgspec
from msgspec import UNSET

from gateway.health import health_check, require_reachable_port
from gateway.placement import Demand
from gateway.supervision import (
    auto_standby_policy,
    check_tags,
    expiry_on_create,
    restart_policy,
)
from gateway.view import FleetView
from schemas.api import (
    MAX_VCPUS,
    CreateInstanceRequest,
    Hypervisor,
    ImageStatus,
    NetworkRequest,
)
from schemas.errors import BadRequest, Conflict, NotFound
from schemas.messages import Create, MountSpec, host_port_key
from schemas.references import normalize_reference
from schemas.sizes import GIB, SizeError, parse_bandwidth, parse_rate, parse_size
from schemas.subjects import image_key

__all__ = ["CreatePlan", "plan_create"]

DEFAULT_SIZE: Final = 1 * GIB
DEFAULT_OVERLAY_SIZE: Final = 10 * GIB
DEFAULT_VCPUS: Final = 2
MAX_MEMORY: Final = 32 * GIB
MAX_OVERLAY_SIZE: Final = 100 * GIB


@dataclass(frozen=True)
class CreatePlan:
    """A checked create request: the command, what it needs, and where it must run."""

    command: Create
    demand: Demand
    #: The host of the instance's volumes, which the instance must run on.
    pinned_to: str | None
    #: Labels the chosen host must advertise (a vmfleet extension of the request).
    labels: dict[str, str] = field(default_factory=dict)
    #: The image's normalised name and, when the fleet knows it, its digest: placement
    #: prefers a host whose heartbeat lists one of them.
    images: frozenset[str] = frozenset()


def plan_create(
    req: CreateInstanceRequest,
    view: FleetView,
    *,
    command_id: str,
    instance_id: str,
    issued_at: datetime,
) -> CreatePlan:
    """Every handler-level check of hypeman's create, then the Create command."""
    _refuse_unsupported(req)
    tags = check_tags(req.tags) if isinstance(req.tags, dict) else {}
    expires_at = expiry_on_create(req.ttl, req.expires_at, issued_at)
    images, image_digest = _check_image(req.image, view)
    size = _size("size", req.size, DEFAULT_SIZE)
    hotplug = _size("hotplug_size", req.hotplug_size, 0)
    overlay = _size("overlay_size", req.overlay_size, DEFAULT_OVERLAY_SIZE)
    _check_limits(size, hotplug, overlay)
    vcpus = _vcpus(req.vcpus)
    network = req.network if isinstance(req.network, NetworkRequest) else NetworkRequest()
    mounts = _mounts(req)
    # A request that names no hypervisor runs under the one its host has (QEMU or Cloud
    # Hypervisor): both run every image the same way.
    hypervisor = req.hypervisor if isinstance(req.hypervisor, Hypervisor) else None
    command = Create(
        id=command_id,
        instance_id=instance_id,
        issued_at=issued_at,
        name=req.name,
        image=req.image,
        image_digest=image_digest,
        size_bytes=size,
        hotplug_bytes=hotplug,
        overlay_bytes=overlay,
        disk_io_bps=_rate("disk_io_bps", req.disk_io_bps, parse_rate),
        vcpus=vcpus,
        env=req.env if isinstance(req.env, dict) else {},
        volumes=mounts,
        port_mappings=req.port_mappings if isinstance(req.port_mappings, list) else [],
        network_enabled=network.enabled,
        bandwidth_download_bps=_rate(
            "bandwidth_download", network.bandwidth_download, parse_bandwidth
        ),
        bandwidth_upload_bps=_rate("bandwidth_upload", network.bandwidth_upload, parse_bandwidth),
        hypervisor=hypervisor,
        cmd=req.cmd if isinstance(req.cmd, list) else None,
        entrypoint=req.entrypoint if isinstance(req.entrypoint, list) else None,
        tags=tags,
        expires_at=expires_at,
        restart_policy=restart_policy(req.restart_policy),
        health_check=health_check(req.health_check, network_enabled=network.enabled),
        auto_standby=auto_standby_policy(req.auto_standby),
    )
    needs_bridge = _check_bandwidth(command, view) or _check_health_route(command, view)
    demand = Demand(
        vcpus=vcpus,
        memory_bytes=size + hotplug,
        hypervisor=hypervisor,
        disk_bytes=command.disk_bytes,
        ports=frozenset(host_port_key(m.host_port, m.protocol) for m in command.port_mappings),
        shaped_network=needs_bridge,
    )
    return CreatePlan(
        command=command,
        demand=demand,
        pinned_to=_pinned_host(req, _volumes_host(mounts, view)),
        labels=req.host_labels if isinstance(req.host_labels, dict) else {},
        images=images,
    )


def _check_bandwidth(command: Create, view: FleetView) -> bool:
    """True when the instance has bandwidth limits (placement then takes a bridge-mode
    host). Refused when every live host networks in user mode, where nothing can shape:
    QEMU's own network stack moves the packets."""
    limits = {
        "bandwidth_download": command.bandwidth_download_bps,
        "bandwidth_upload": command.bandwidth_upload_bps,
    }
    limited = [name for name, value in limits.items() if value > 0]
    if not command.network_enabled or not limited:
        return False
    modes = {host.network_mode for host in view.live_hosts()}
    if modes and "bridge" not in modes:
        raise BadRequest(
            f"network.{limited[0]} cannot be enforced in the user network mode the fleet's "
            "hosts run: leave it out, or add a host in bridge mode (VMFLEET_NETWORK=bridge)",
            code="not_supported",
        )
    return True


def _check_health_route(command: Create, view: FleetView) -> bool:
    """True when the instance's http/tcp check can reach the guest only on a bridge-mode
    host (its port has no mapping, which user mode would probe through); refused when
    every live host networks in user mode."""
    try:
        require_reachable_port(command.health_check, command.port_mappings, user_mode=True)
    except BadRequest:
        modes = {host.network_mode for host in view.live_hosts()}
        if modes and "bridge" not in modes:
            raise
        return True
    return False


def _pinned_host(req: CreateInstanceRequest, volumes_host: str | None) -> str | None:
    """The request's ``host`` and its volumes' host must agree when both pin it."""
    asked = req.host if isinstance(req.host, str) else None
    if asked is not None and volumes_host is not None and asked != volumes_host:
        raise Conflict(
            f"the volumes live on host {volumes_host}, not on the requested host {asked}",
            code="volume_on_other_host",
        )
    return asked or volumes_host


def _refuse_unsupported(req: CreateInstanceRequest) -> None:
    if isinstance(req.devices, list) and req.devices:
        raise BadRequest("device passthrough is not supported by vmfleet", code="not_supported")
    if req.gpu is not UNSET and getattr(req.gpu, "profile", UNSET) is not UNSET:
        raise BadRequest("vGPU profiles are not supported by vmfleet", code="not_supported")


def _check_image(reference: str, view: FleetView) -> tuple[frozenset[str], str]:
    """hypeman needs a ready image; vmfleet's hosts pull on demand, so only an image the
    fleet knows and that is *not* ready (pulling, failed) is refused. Returns the names a
    host that has the image ready lists it by (its name, and its digest if known), and the
    digest to boot ("" if none is known): a host that has it boots it without asking the
    registry again, as hypeman's create runs the image as it was pulled (POST /images is
    what refreshes a tag)."""
    ref = normalize_reference(reference)
    record = view.images.get(image_key(ref.name))
    if record is not None and record.status is not ImageStatus.READY:
        raise BadRequest(
            f"image not ready: image status is {record.status.value}", code="image_not_ready"
        )
    ready = record.digest if record is not None else None
    names = frozenset({ref.name, *(d for d in (ref.digest, ready) if d)})
    return names, ref.digest or ready or ""


def _size(field: str, raw: str | msgspec.UnsetType, default: int) -> int:
    if raw is UNSET or raw == "":
        return default
    assert isinstance(raw, str)
    try:
        return parse_size(raw)
    except SizeError as exc:
        raise BadRequest(f"invalid {field} format: {exc}", code=f"invalid_{field}") from None


def _rate(field: str, raw: str | msgspec.UnsetType, parse: Callable[[str], int]) -> int:
    if raw is UNSET or raw == "":
        return 0
    assert isinstance(raw, str)
    try:
        return parse(raw)
    except SizeError as exc:
        raise BadRequest(f"invalid {field} format: {exc}", code=f"invalid_{field}") from None


def _check_limits(size: int, hotplug: int, overlay: int) -> None:
    if size + hotplug > MAX_MEMORY:
        raise BadRequest(
            "total memory (size + hotplug_size) exceeds the maximum of 32GB", code="invalid_size"
        )
    if overlay > MAX_OVERLAY_SIZE:
        raise BadRequest("overlay_size exceeds the maximum of 100GB", code="invalid_overlay_size")


def _vcpus(raw: int | msgspec.UnsetType) -> int:
    vcpus = raw if isinstance(raw, int) and raw > 0 else DEFAULT_VCPUS
    if vcpus > MAX_VCPUS:
        raise BadRequest(
            f"vcpus {vcpus} exceeds the maximum of {MAX_VCPUS} per instance", code="invalid_vcpus"
        )
    return vcpus


def _mounts(req: CreateInstanceRequest) -> list[MountSpec]:
    if not isinstance(req.volumes, list):
        return []
    mounts = []
    for mount in req.volumes:
        overlay = mount.overlay is True
        overlay_bytes = 0
        if overlay and isinstance(mount.overlay_size, str) and mount.overlay_size:
            try:
                overlay_bytes = parse_size(mount.overlay_size)
            except SizeError as exc:
                raise BadRequest(
                    f"invalid overlay_size for volume {mount.volume_id}: {exc}",
                    code="invalid_overlay_size",
                ) from None
            if overlay_bytes > MAX_OVERLAY_SIZE:
                raise BadRequest(
                    f"overlay_size for volume {mount.volume_id} exceeds the maximum of 100GB",
                    code="invalid_overlay_size",
                )
        mounts.append(
            MountSpec(
                volume_id=mount.volume_id,
                mount_path=mount.mount_path,
                readonly=mount.readonly,
                overlay=overlay,
                overlay_bytes=overlay_bytes,
            )
        )
    return mounts


def _volumes_host(mounts: list[MountSpec], view: FleetView) -> str | None:
    """The one host holding every mounted volume (volumes are looked up by exact id)."""
    hosts = set()
    for mount in mounts:
        volume = view.volumes.get(mount.volume_id)
        if volume is None:
            raise NotFound(f"volume {mount.volume_id} not found")
        hosts.add(volume.host)
    if len(hosts) > 1:
        raise Conflict(
            "the volumes are on different hosts; an instance can only mount volumes of one host",
            code="volumes_on_different_hosts",
        )
    return next(iter(hosts), None)
