"""What the fleet has and what its instances use: ``GET /instances/{id}/stats`` (asked of
the owning host, which reads its VMM), ``GET /resources`` and ``GET /capabilities`` (from
the live hosts' heartbeats and the records in the view, no round trip).

``/resources`` is hypeman's shape summed over the live hosts, with each host's own part
in ``hosts`` (a vmfleet extension); disk is counted as placement counts it (what is
written, plus what the sparse disks may still take).
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
from collections.abc import Iterable
from typing import Final

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.resolve import resolve_instance
from gateway.responses import MsgspecResponse
from gateway.service import Gateway, gateway
from schemas.api import (
    Capabilities,
    CapabilitiesDefaultRuntime,
    CapabilitiesHost,
    CapabilitiesImages,
    CapabilitiesNetwork,
    CapabilitiesRuntime,
    CapabilitiesServer,
    HostResources,
    Hypervisor,
    InstanceStats,
    ResourceAllocation,
    Resources,
    ResourceStatus,
)
from schemas.errors import HostUnavailable, VmfleetError, error_from_info
from schemas.messages import HostRecord, InstanceRecord, StatsReply

__all__ = ["routes"]

_STATS_TIMEOUT_S: Final = 5.0
_STATS_REPLY: Final = msgspec.json.Decoder(StatsReply)
#: Server-level features of hypeman's list that vmfleet serves.
_FEATURES: Final = ("exec", "images", "instances", "logs", "volumes")
#: What every runtime of vmfleet does (hypeman's runtime feature ids).
_RUNTIME_FEATURES: Final = ("disk-io-limit", "standby", "vsock")
_GO_ARCH: Final = {"x86_64": "amd64", "aarch64": "arm64"}


# -- one instance --------------------------------------------------------------------------


async def instance_stats(request: Request) -> Response:
    """Usage now, read on the owning host; all zeros when no VMM runs."""
    gw = gateway(request)
    record = resolve_instance(gw.view, request.path_params["id"])
    if gw.view.live_host(record.host) is None:
        raise HostUnavailable(f"host {record.host} is not available to read the stats from")
    return MsgspecResponse(await _stats_of(gw, record))


async def _stats_of(gw: Gateway, record: InstanceRecord) -> InstanceStats:
    reply = await gw.sender.ask_host(
        record.host, "stats", record.id.encode(), timeout_s=_STATS_TIMEOUT_S
    )
    answer = _STATS_REPLY.decode(reply)
    if answer.stats is None:
        if answer.error is None:
            raise VmfleetError("the host could not read the instance's stats")
        raise error_from_info(answer.error)
    return answer.stats


# -- the fleet -------------------------------------------------------------------------------


async def resources(request: Request) -> Response:
    gw = gateway(request)
    hosts = gw.view.live_hosts()
    records = list(gw.view.instances.values())
    parts = [_host_resources(gw, host, records) for host in hosts]
    return MsgspecResponse(
        Resources(
            cpu=_summed("cpu", (p.cpu for p in parts), gw.config.cpu_overcommit),
            memory=_summed("memory", (p.memory for p in parts), gw.config.memory_overcommit),
            disk=_summed("disk", (p.disk for p in parts), 1.0),
            network=_summed("network", (p.network for p in parts), 1.0),
            hosts=parts,
            allocations=[_allocation(r) for r in sorted(records, key=lambda r: r.id)],
        )
    )


def _host_resources(gw: Gateway, host: HostRecord, records: list[InstanceRecord]) -> HostResources:
    disk_used = host.disk_total_bytes - host.disk_free_bytes + host.disk_promised_bytes
    bandwidth = sum(r.bandwidth_download_bps for r in records if r.host == host.id)
    return HostResources(
        host=host.id,
        cpu=_status("cpu", host.vcpus_total, gw.config.cpu_overcommit, host.vcpus_allocated),
        memory=_status(
            "memory",
            host.memory_total_bytes,
            gw.config.memory_overcommit,
            host.memory_allocated_bytes,
        ),
        disk=_status("disk", host.disk_total_bytes, 1.0, disk_used),
        # No host measures its link: the capacity is unknown (0), the limits are counted.
        network=_status("network", 0, 1.0, bandwidth, source="unmeasured"),
    )


def _status(
    kind: str, capacity: int, ratio: float, allocated: int, *, source: str = "detected"
) -> ResourceStatus:
    limit = int(capacity * ratio)
    return ResourceStatus(
        type=kind,
        capacity=capacity,
        oversub_ratio=ratio,
        effective_limit=limit,
        allocated=allocated,
        available=max(0, limit - allocated),
        source=source,
    )


def _summed(kind: str, parts: Iterable[ResourceStatus], ratio: float) -> ResourceStatus:
    listed = list(parts)
    return ResourceStatus(
        type=kind,
        capacity=sum(p.capacity for p in listed),
        oversub_ratio=ratio,
        effective_limit=sum(p.effective_limit for p in listed),
        allocated=sum(p.allocated for p in listed),
        available=sum(p.available for p in listed),
        source=listed[0].source if listed else "detected",
    )


def _allocation(record: InstanceRecord) -> ResourceAllocation:
    return ResourceAllocation(
        instance_id=record.id,
        instance_name=record.name,
        host=record.host,
        cpu=record.vcpus,
        memory_bytes=record.size_bytes + record.hotplug_bytes,
        disk_bytes=record.overlay_bytes + sum(m.overlay_bytes for m in record.volumes),
        disk_io_bps=record.disk_io_bps,
        network_download_bps=record.bandwidth_download_bps,
        network_upload_bps=record.bandwidth_upload_bps,
    )


async def capabilities(request: Request) -> Response:
    gw = gateway(request)
    hosts = gw.view.live_hosts()
    offered = {h for host in hosts for h in host.hypervisors}
    default = hosts[0].hypervisors[0] if hosts and hosts[0].hypervisors else Hypervisor.QEMU
    arch = _GO_ARCH.get(platform.machine(), platform.machine())
    bridged = any(host.network_mode == "bridge" for host in hosts)
    return MsgspecResponse(
        Capabilities(
            server=CapabilitiesServer(api_version=_api_version(request), version=_version()),
            host=CapabilitiesHost(os="linux", arch=arch),
            default_runtime=CapabilitiesDefaultRuntime(
                name=default.value, available=default in offered
            ),
            runtimes=[
                CapabilitiesRuntime(
                    name=h.value, available=h in offered, features=list(_RUNTIME_FEATURES)
                )
                for h in sorted(Hypervisor, key=lambda h: h.value)
            ],
            features=list(_FEATURES),
            images=CapabilitiesImages(
                default_platform=f"linux/{arch}", platforms=[f"linux/{arch}"]
            ),
            # bridge mode: a TAP per guest on one bridge; user mode: QEMU's own NAT.
            network=CapabilitiesNetwork(
                model="bridge" if bridged else "nat", guest_to_guest=bridged
            ),
        )
    )


def _api_version(request: Request) -> str:
    return _spec_version(bytes(request.app.state.spec_json))


@functools.cache
def _spec_version(spec_json: bytes) -> str:
    info = msgspec.json.decode(spec_json).get("info", {})
    return str(info.get("version", "unknown"))


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("vmfleet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


routes = [
    Route("/instances/{id}/stats", instance_stats, methods=["GET"]),
    Route("/resources", resources, methods=["GET"]),
    Route("/capabilities", capabilities, methods=["GET"]),
]
