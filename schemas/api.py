"""The HTTP API's JSON shapes: hypeman's ``openapi.yaml`` schemas as msgspec Structs.

Why these rules (see ``shared/reference/hypeman-api.md`` §0 and §1.2):

* **Null versus omitted.** Fields the spec marks ``nullable`` are always sent, as ``null``
  when unset: they are ``T | None = None``. Every other optional field is left out when empty:
  it is ``T | UnsetType = UNSET``. ``omit_defaults`` is not used on any struct that has a
  nullable field, because it would drop those nulls too.
* **Unknown request fields are ignored** (no ``forbid_unknown_fields``). hypeman's spec has no
  ``additionalProperties: false`` and the newer SDK sends keys the snapshot does not know
  (``tags``, ``ttl``, ...). Rejecting them would break real clients. This deliberately departs
  from style anchor 4; the constraints hypeman's validator enforces (name pattern and length,
  enums, types) are encoded with ``msgspec.Meta`` instead, so decoding fails with a message
  that names the field (``... - at `$.name```).
* **Checks hypeman does in its handlers stay out of the schema** (size strings, mount paths,
  image references): the gateway reports them with hypeman's specific error codes
  (``invalid_size``, ...), not the validator's generic ``"Bad Request"``.
* **Field order is alphabetical** in response structs, because oapi-codegen emits Go struct
  fields in that order; our JSON then reads the same as hypeman's.
* Timestamps are timezone-aware ``datetime`` values; msgspec writes RFC 3339.

vmfleet extensions (ignored by hypeman clients): ``port_mappings`` on create and on Instance,
``host`` on Instance, and ``cmd``/``entrypoint`` overrides on create (as the newer SDK sends).
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, UnsetType

from schemas.autostandby import AutoStandbyPolicy

__all__ = [
    "MAX_VCPUS",
    "NAME_MAX_LENGTH",
    "NAME_PATTERN",
    "VOLUME_ID_PATTERN",
    "AttachVolumeRequest",
    "Capabilities",
    "CapabilitiesDefaultRuntime",
    "CapabilitiesHost",
    "CapabilitiesImages",
    "CapabilitiesNetwork",
    "CapabilitiesRuntime",
    "CapabilitiesServer",
    "CreateImageRequest",
    "CreateInstanceRequest",
    "CreateVolumeRequest",
    "DrainRequest",
    "DrainResult",
    "Error",
    "GPUConfig",
    "Health",
    "HealthCheck",
    "HealthCheckExec",
    "HealthCheckHTTP",
    "HealthCheckTCP",
    "HealthStatusName",
    "HostResources",
    "Hypervisor",
    "Image",
    "ImageStatus",
    "Instance",
    "InstanceGPU",
    "InstanceHealthStatus",
    "InstanceName",
    "InstanceNetwork",
    "InstanceState",
    "InstanceStats",
    "NetworkRequest",
    "PortMapping",
    "ResourceAllocation",
    "ResourceStatus",
    "Resources",
    "RestartPolicy",
    "RestartStatus",
    "StartInstanceRequest",
    "Timestamp",
    "UpdateInstanceRequest",
    "Volume",
    "VolumeAttachment",
    "VolumeMount",
    "WaitForStateResponse",
    "go_duration",
]

NAME_PATTERN: Final = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"
NAME_MAX_LENGTH: Final = 63
# hypeman does not validate custom volume ids; vmfleet uses them as KV keys, subject tokens
# and directory names, so it restricts them to a safe alphabet (no dots, no slashes).
VOLUME_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
#: hypeman's per-instance vCPU limit: the gateway refuses more, and the worker checks it
#: again for a command that did not come through a gateway.
MAX_VCPUS: Final = 16


def _matches_whole(pattern: str, value: str, path: str) -> None:
    """msgspec checks a ``pattern`` with ``re.search``, where ``$`` also matches before a
    final newline, so ``"web\\n"`` would pass. hypeman's validator (Go) refuses it, and
    vmfleet makes KV keys, subject tokens and directories of these values: a volume id
    ending in a newline once wedged its host's NATS connection. Same message as msgspec's."""
    if re.fullmatch(pattern, value) is None:
        raise ValueError(f"Expected `str` matching regex {pattern!r} - at `{path}`")


Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
"""An aware datetime (RFC 3339 on the wire); naive values are rejected when decoding."""

InstanceName = Annotated[
    str,
    msgspec.Meta(
        pattern=NAME_PATTERN,
        max_length=NAME_MAX_LENGTH,
        description="lowercase letters, digits and dashes; no leading or trailing dash",
    ),
]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class InstanceState(enum.StrEnum):
    """hypeman's states: the seven of its API description plus the SDK's ``Initializing``
    (the VM runs, the guest is not ready yet)."""

    CREATED = "Created"
    INITIALIZING = "Initializing"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"
    STOPPED = "Stopped"
    STANDBY = "Standby"
    UNKNOWN = "Unknown"


class Hypervisor(enum.StrEnum):
    """Hypervisors the API accepts (hypeman's enum for the snapshot)."""

    CLOUD_HYPERVISOR = "cloud-hypervisor"
    QEMU = "qemu"


class ImageStatus(enum.StrEnum):
    """Build status of an image."""

    PENDING = "pending"
    PULLING = "pulling"
    CONVERTING = "converting"
    READY = "ready"
    FAILED = "failed"


class Error(msgspec.Struct, kw_only=True):
    """Every JSON error body: ``{code, message}`` (hypeman never sends details/inner_error)."""

    code: str
    message: str


class Health(msgspec.Struct, kw_only=True):
    """``GET /health`` body."""

    status: Literal["ok"] = "ok"


class Readiness(msgspec.Struct, kw_only=True):
    """``GET /ready`` body (a vmfleet extension): whether the fleet can take work. A fresh
    fleet is not ready until a worker's first heartbeat: creates, volumes and image pulls
    answer 503 ``no_capacity`` until then."""

    ready: bool
    #: Live hosts, and of those the undrained ones (new work goes only there).
    live_hosts: int
    undrained_hosts: int


class PortMapping(msgspec.Struct, kw_only=True):
    """A host port forwarded to a guest port (declared by hypeman, implemented by vmfleet)."""

    guest_port: Port
    host_port: Port
    protocol: Literal["tcp", "udp"] = "tcp"


class VolumeMount(msgspec.Struct, kw_only=True):
    """A volume attached to an instance, in requests and responses.

    In responses ``readonly`` is always sent; ``overlay`` and ``overlay_size`` (HR form) only
    when the mount has an overlay.
    """

    mount_path: str
    overlay: bool | UnsetType = UNSET
    overlay_size: str | UnsetType = UNSET
    readonly: bool = False
    volume_id: str


class NetworkRequest(msgspec.Struct, kw_only=True):
    """``network`` in a create request; bandwidths are strings parsed by the gateway."""

    bandwidth_download: str | UnsetType = UNSET
    bandwidth_upload: str | UnsetType = UNSET
    enabled: bool = True


class GPUConfig(msgspec.Struct, kw_only=True):
    """vGPU request (declared so the gateway can refuse it explicitly)."""

    profile: str | UnsetType = UNSET


class CreateInstanceRequest(msgspec.Struct, kw_only=True):
    """Body of ``POST /instances``. Unset size strings mean "use the default"."""

    name: InstanceName
    image: str
    size: str | UnsetType = UNSET
    hotplug_size: str | UnsetType = UNSET
    overlay_size: str | UnsetType = UNSET
    disk_io_bps: str | UnsetType = UNSET
    vcpus: Annotated[int, msgspec.Meta(ge=0)] | UnsetType = UNSET
    env: dict[str, str] | UnsetType = UNSET
    network: NetworkRequest | UnsetType = UNSET
    devices: list[str] | UnsetType = UNSET
    gpu: GPUConfig | UnsetType = UNSET
    volumes: list[VolumeMount] | UnsetType = UNSET
    hypervisor: Hypervisor | UnsetType = UNSET
    # vmfleet extensions / newer-SDK fields
    port_mappings: list[PortMapping] | UnsetType = UNSET
    cmd: list[str] | UnsetType = UNSET
    entrypoint: list[str] | UnsetType = UNSET
    #: Placement constraints (vmfleet extensions): run on this host, or on a host whose
    #: advertised labels include all of these.
    host: str | UnsetType = UNSET
    host_labels: dict[str, str] | UnsetType = UNSET
    #: The newer SDK's labels and lifetime (``gateway.plan`` checks them: hypeman's codes).
    tags: dict[str, str] | UnsetType = UNSET
    ttl: str | UnsetType = UNSET
    expires_at: Timestamp | UnsetType = UNSET
    #: The supervision policies, decoded loosely and checked by ``gateway.supervision`` and
    #: ``gateway.health`` so that a bad one gets hypeman's code naming the field.
    restart_policy: Any | UnsetType = UNSET
    health_check: Any | UnsetType = UNSET
    auto_standby: Any | UnsetType = UNSET

    def __post_init__(self) -> None:
        _matches_whole(NAME_PATTERN, self.name, "$.name")


class InstanceNetwork(msgspec.Struct, kw_only=True):
    """``network`` of an Instance: ``name`` only when enabled, ``ip``/``mac`` always (null when
    disabled), bandwidths only when > 0."""

    bandwidth_download: str | UnsetType = UNSET
    bandwidth_upload: str | UnsetType = UNSET
    enabled: bool
    ip: str | None = None
    mac: str | None = None
    name: str | UnsetType = UNSET


class InstanceGPU(msgspec.Struct, kw_only=True):
    """``gpu`` of an Instance (only present when a vGPU profile is set)."""

    mdev_uuid: str | UnsetType = UNSET
    profile: str | UnsetType = UNSET


class Instance(msgspec.Struct, kw_only=True):
    """Instance response. Build it with ``InstanceRecord.to_api()``, the single renderer."""

    auto_standby: AutoStandbyPolicy | UnsetType = UNSET
    created_at: Timestamp
    #: The lowercase state it is in, since when (left out for records older than these).
    current_phase: str | UnsetType = UNSET
    current_phase_since: Timestamp | UnsetType = UNSET
    disk_io_bps: str | UnsetType = UNSET
    env: dict[str, str] | UnsetType = UNSET
    #: How the app ended, once it has (left out until then, and again after a start).
    exit_code: int | UnsetType = UNSET
    exit_message: str | UnsetType = UNSET
    #: When the instance is deleted on its own (left out: never; the SDK reads None).
    expires_at: Timestamp | UnsetType = UNSET
    gpu: InstanceGPU | UnsetType = UNSET
    has_snapshot: bool
    host: str | UnsetType = UNSET
    health_check: HealthCheck | UnsetType = UNSET
    health_status: InstanceHealthStatus | UnsetType = UNSET
    hotplug_size: str
    hypervisor: Hypervisor
    id: str
    image: str
    name: str
    network: InstanceNetwork
    overlay_size: str
    #: Milliseconds spent in each lowercase state, the current one up to the response.
    phase_durations_ms: dict[str, int] | UnsetType = UNSET
    port_mappings: list[PortMapping] | UnsetType = UNSET
    restart_policy: RestartPolicy | UnsetType = UNSET
    restart_status: RestartStatus | UnsetType = UNSET
    size: str
    started_at: Timestamp | None = None
    state: InstanceState
    state_error: str | None = None
    stopped_at: Timestamp | None = None
    tags: dict[str, str] | UnsetType = UNSET
    vcpus: int
    volumes: list[VolumeMount] | UnsetType = UNSET


class RestartPolicy(msgspec.Struct, kw_only=True):
    """``restart_policy`` of an Instance: durations as Go prints them (``"10m0s"``);
    ``max_attempts`` left out when 0 (unlimited)."""

    backoff: str
    max_attempts: int | UnsetType = UNSET
    policy: Literal["always", "on_failure"]
    stable_after: str


class RestartStatus(msgspec.Struct, kw_only=True):
    """``restart_status`` of an Instance (left out when there is nothing to say)."""

    attempts: int
    blocked_reason: Literal["manual_stop", "max_attempts_exceeded"] | UnsetType = UNSET
    last_attempt_at: Timestamp | UnsetType = UNSET
    last_reason: Literal["health_check_failed"] | UnsetType = UNSET
    next_attempt_at: Timestamp | UnsetType = UNSET


class HealthCheckHTTP(msgspec.Struct, kw_only=True):
    """``health_check.http``: a GET of ``path`` that must answer ``expected_status``."""

    expected_status: int | UnsetType = UNSET
    path: str | UnsetType = UNSET
    port: int
    scheme: Literal["http", "https"] | UnsetType = UNSET


class HealthCheckTCP(msgspec.Struct, kw_only=True):
    """``health_check.tcp``: a connection to ``port`` that must be accepted."""

    port: int


class HealthCheckExec(msgspec.Struct, kw_only=True):
    """``health_check.exec``: a command run by the guest agent that must exit 0."""

    command: list[str]
    working_dir: str | UnsetType = UNSET


class HealthCheck(msgspec.Struct, kw_only=True):
    """``health_check`` of an Instance, defaults filled in, durations as Go prints them."""

    exec: HealthCheckExec | UnsetType = UNSET
    failure_threshold: int
    http: HealthCheckHTTP | UnsetType = UNSET
    interval: str
    start_period: str
    success_threshold: int
    tcp: HealthCheckTCP | UnsetType = UNSET
    timeout: str
    type: Literal["none", "http", "tcp", "exec"]


HealthStatusName = Literal["disabled", "starting", "healthy", "unhealthy", "unknown"]


class InstanceHealthStatus(msgspec.Struct, kw_only=True):
    """``health_status`` of an Instance: ``disabled`` without a check, ``unknown`` while the
    instance is neither Running nor Initializing."""

    consecutive_failures: int
    consecutive_successes: int
    last_checked_at: Timestamp | UnsetType = UNSET
    last_error: str | UnsetType = UNSET
    last_failure_at: Timestamp | UnsetType = UNSET
    last_success_at: Timestamp | UnsetType = UNSET
    status: HealthStatusName


def go_duration(seconds: float) -> str:
    """``seconds`` as Go's ``time.Duration.String()`` prints it: ``"5s"``, ``"10m0s"``,
    ``"1h0m0s"``, ``"1.5s"``, ``"500ms"``."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _trim(ns, size) + unit
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = _trim(rest, 1_000_000_000) + "s"
    if hours or minutes:
        text = f"{minutes}m" + text
    if hours:
        text = f"{hours}h" + text
    return sign + text


def _trim(value: int, unit: int) -> str:
    whole, frac = divmod(value, unit)
    if not frac:
        return str(whole)
    digits = len(str(unit)) - 1
    return f"{whole}." + f"{frac:0{digits}d}".rstrip("0")


class UpdateInstanceRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``PATCH /instances/{id}`` (hypeman's InstanceUpdateParams). Unlike create, an
    unknown field is refused: a client that believes it changed something must be told
    it did not. The policies are decoded loosely and checked by ``gateway.supervision``."""

    auto_standby: Any | UnsetType = UNSET
    env: dict[str, str] | UnsetType = UNSET
    expires_at: Timestamp | UnsetType = UNSET
    health_check: Any | UnsetType = UNSET
    restart_policy: Any | UnsetType = UNSET
    ttl: str | UnsetType = UNSET


class CreateImageRequest(msgspec.Struct, kw_only=True):
    """Body of ``POST /images``; the reference is checked by the gateway (``invalid_name``)."""

    name: str


class Image(msgspec.Struct, kw_only=True):
    """Image response; every nullable field is always sent."""

    cmd: list[str] | None = None
    created_at: Timestamp
    digest: str
    entrypoint: list[str] | None = None
    env: dict[str, str] | UnsetType = UNSET
    error: str | None = None
    name: str
    queue_position: int | None = None
    size_bytes: int | None = None
    status: ImageStatus
    working_dir: str | None = None


class CreateVolumeRequest(msgspec.Struct, kw_only=True):
    """JSON body of ``POST /volumes``."""

    id: Annotated[str, msgspec.Meta(pattern=VOLUME_ID_PATTERN)] | UnsetType = UNSET
    name: str
    size_gb: Annotated[int, msgspec.Meta(ge=1)]

    def __post_init__(self) -> None:
        if isinstance(self.id, str):
            _matches_whole(VOLUME_ID_PATTERN, self.id, "$.id")


class VolumeAttachment(msgspec.Struct, kw_only=True):
    """One instance using a volume."""

    instance_id: str
    mount_path: str
    readonly: bool


class Volume(msgspec.Struct, kw_only=True):
    """Volume response; ``attachments`` is left out when there are none."""

    attachments: list[VolumeAttachment] | UnsetType = UNSET
    created_at: Timestamp
    id: str
    name: str
    size_gb: int


class AttachVolumeRequest(msgspec.Struct, kw_only=True):
    """Body of ``POST /instances/{id}/volumes/{volumeId}``."""

    mount_path: str
    readonly: bool = False


class StartInstanceRequest(msgspec.Struct, kw_only=True):
    """Optional body of ``POST /instances/{id}/start`` (newer SDK): overrides for this boot."""

    cmd: list[str] | UnsetType = UNSET
    entrypoint: list[str] | UnsetType = UNSET


class WaitForStateResponse(msgspec.Struct, kw_only=True):
    """``GET /instances/{id}/wait`` (the newer SDK's call; a vmfleet extension)."""

    state: InstanceState
    state_error: str | None = None
    timed_out: bool


# -- vmfleet extensions: draining a host ------------------------------------------------


class DrainRequest(msgspec.Struct, kw_only=True):
    """Body of ``POST /hosts/{id}/drain`` (all optional)."""

    standby: bool | UnsetType = UNSET
    #: vmfleet extension: move the host's Standby instances (with ``standby``, its running
    #: ones too, once in standby) to other hosts, keeping id, name and memory state.
    move: bool | UnsetType = UNSET
    reason: str | UnsetType = UNSET


class DrainResult(msgspec.Struct, kw_only=True):
    host: str
    drained: bool
    #: Instances put in standby by this drain, and those that could not be (id → error).
    standby: list[str] = []
    errors: dict[str, str] = {}
    #: Instances moved to another host by this drain (id → the host it lives on now).
    moved: dict[str, str] = {}


# -- what instances and hosts use (hypeman's InstanceStats, Resources, Capabilities) -------


class InstanceStats(msgspec.Struct, kw_only=True):
    """``GET /instances/{id}/stats``: read on the owning host from its VMM's /proc and its
    TAP's counters; all zeros while no VMM runs. ``network_*`` are as the guest sees them
    (what it received, what it sent)."""

    allocated_memory_bytes: int
    allocated_vcpus: int
    cpu_seconds: float
    instance_id: str
    instance_name: str
    memory_rss_bytes: int
    memory_utilization_ratio: float | UnsetType = UNSET
    memory_vms_bytes: int
    network_rx_bytes: int
    network_tx_bytes: int


class ResourceStatus(msgspec.Struct, kw_only=True):
    """One resource of ``GET /resources``: what there is, what the ratio makes of it, and
    what instances hold."""

    allocated: int
    available: int
    capacity: int
    effective_limit: int
    oversub_ratio: float
    source: str | UnsetType = UNSET
    type: str


class ResourceAllocation(msgspec.Struct, kw_only=True):
    """What one instance holds (``host``: a vmfleet extension)."""

    cpu: int
    disk_bytes: int
    disk_io_bps: int
    host: str
    instance_id: str
    instance_name: str
    memory_bytes: int
    network_download_bps: int
    network_upload_bps: int


class HostResources(msgspec.Struct, kw_only=True):
    """One host's part of ``GET /resources`` (a vmfleet extension: ``hosts``)."""

    cpu: ResourceStatus
    disk: ResourceStatus
    host: str
    memory: ResourceStatus
    network: ResourceStatus


class Resources(msgspec.Struct, kw_only=True):
    """``GET /resources``: hypeman's shape summed over the live hosts, and per host."""

    allocations: list[ResourceAllocation]
    cpu: ResourceStatus
    disk: ResourceStatus
    hosts: list[HostResources]
    memory: ResourceStatus
    network: ResourceStatus


class CapabilitiesServer(msgspec.Struct, kw_only=True):
    api_version: str
    version: str


class CapabilitiesHost(msgspec.Struct, kw_only=True):
    arch: str
    os: str


class CapabilitiesRuntime(msgspec.Struct, kw_only=True):
    available: bool
    features: list[str]
    name: str


class CapabilitiesDefaultRuntime(msgspec.Struct, kw_only=True):
    available: bool
    name: str


class CapabilitiesImages(msgspec.Struct, kw_only=True):
    default_platform: str
    platforms: list[str]


class CapabilitiesNetwork(msgspec.Struct, kw_only=True):
    guest_to_guest: bool
    model: Literal["bridge", "nat"]


class Capabilities(msgspec.Struct, kw_only=True):
    """``GET /capabilities``: what this fleet serves, from its live hosts' heartbeats."""

    default_runtime: CapabilitiesDefaultRuntime
    features: list[str]
    host: CapabilitiesHost
    images: CapabilitiesImages
    network: CapabilitiesNetwork
    runtimes: list[CapabilitiesRuntime]
    server: CapabilitiesServer
