"""Checking requests and turning them into commands, with hypeman's error codes.

Two layers, as in hypeman (reference §1.3):

* What hypeman's OpenAPI validator rejects (malformed JSON, wrong types, the name pattern,
  enums, bad query parameters) is a 400 with code ``"Bad Request"`` and a message that
  names the field. msgspec's decoders enforce the schema; this module words the errors.
* What hypeman's handlers check (size strings, limits, image readiness) gets the handler's
  specific code: ``invalid_size``, ``invalid_hotplug_size``, ``image_not_ready``, ...

Sizes are parsed here, once: a command carries bytes, and a worker never parses a size
string. Mount paths are the worker's to check (it owns hypeman's list of forbidden roots);
its 400 comes back through the command result before anything is made.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, TypeVar

import msgspec
from msgspec import UNSET
from starlette.requests import Request

from gateway.placement import Demand
from gateway.view import FleetView
from schemas.api import CreateInstanceRequest, Hypervisor, ImageStatus, NetworkRequest
from schemas.errors import BadRequest, Conflict, NotFound, PayloadTooLarge
from schemas.messages import Create, MountSpec, host_port_key

# The one reference parser of the project lives with the image cache; the gateway needs
# the same normalised names to find image records (see the report: it belongs in schemas).
from schemas.references import normalize_reference
from schemas.sizes import GIB, SizeError, parse_bandwidth, parse_rate, parse_size
from schemas.subjects import image_key, is_valid_token

__all__ = [
    "MAX_VCPUS",
    "CreatePlan",
    "bad_request",
    "decode_body",
    "idempotency_key",
    "normalize_image",
    "parse_duration",
    "plan_create",
    "query_bool",
    "query_int",
    "read_body",
]

T = TypeVar("T")

DEFAULT_SIZE: Final = 1 * GIB
DEFAULT_OVERLAY_SIZE: Final = 10 * GIB
DEFAULT_VCPUS: Final = 2
MAX_VCPUS: Final = 16
MAX_MEMORY: Final = 32 * GIB
MAX_OVERLAY_SIZE: Final = 100 * GIB
_MAX_IDEMPOTENCY_KEY: Final = 128


def bad_request(message: str) -> BadRequest:
    """hypeman's validator error: code ``"Bad Request"``."""
    return BadRequest(message, code="Bad Request")


# -- bodies ------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) one larger than ``limit`` before and while reading."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise bad_request("invalid Content-Length header")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is larger than {limit} bytes")


def decode_body(decode: Callable[[bytes], T], body: bytes) -> T:
    """Decode a JSON body; a missing, malformed or mistyped one is a 400 naming the field."""
    if not body.strip():
        raise bad_request("request body has an error: value is required but missing")
    try:
        return decode(body)
    except msgspec.ValidationError as exc:
        raise bad_request(f"request body has an error: {exc}") from None
    except msgspec.DecodeError as exc:
        raise bad_request(
            f"request body has an error: failed to decode request body: {exc}"
        ) from None


def idempotency_key(request: Request) -> str | None:
    """The client's ``Idempotency-Key``; it becomes a command id, so one NATS token."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not is_valid_token(key) or len(key) > _MAX_IDEMPOTENCY_KEY or not key.isascii():
        raise BadRequest(
            "Idempotency-Key must be 1-128 printable ASCII characters without spaces, "
            "'.', '*' or '>'",
            code="invalid_idempotency_key",
        )
    return key


# -- query parameters ----------------------------------------------------------------------

_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def _query_error(name: str, value: str, why: str) -> BadRequest:
    return bad_request(f'parameter "{name}" in query has an error: value {value}: {why}')


def query_bool(request: Request, name: str, default: bool) -> bool:
    """A boolean query parameter, with Go's ``strconv.ParseBool`` spellings."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise _query_error(name, raw, "an invalid boolean: invalid syntax")


def query_int(request: Request, name: str, default: int, *, minimum: int = 0) -> int:
    """A whole-number query parameter of at least ``minimum``."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[+-]?[0-9]{1,18}", raw):
        raise _query_error(name, raw, "an invalid integer: invalid syntax")
    value = int(raw)
    if value < minimum:
        raise _query_error(name, raw, f"number must be at least {minimum}")
    return value


_DURATION_PART: Final = re.compile(r"([0-9]*\.?[0-9]*)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration (``"30s"``, ``"1m30s"``, ``"500ms"``) or a bare number of
    seconds; ValueError otherwise."""
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        return float(text)
    position, total = 0, 0.0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None or match.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position == 0 or not math.isfinite(total):
        raise ValueError(f"invalid duration {text!r}")
    return total


# -- images --------------------------------------------------------------------------------


def normalize_image(reference: str) -> str:
    """``alpine`` → ``docker.io/library/alpine:latest``; 400 ``invalid_name`` if malformed."""
    return normalize_reference(reference).name


# -- create ----------------------------------------------------------------------------------


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
    images = _check_image(req.image, view)
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
    )
    demand = Demand(
        vcpus=vcpus,
        memory_bytes=size + hotplug,
        hypervisor=hypervisor,
        disk_bytes=command.disk_bytes,
        ports=frozenset(host_port_key(m.host_port, m.protocol) for m in command.port_mappings),
    )
    return CreatePlan(
        command=command,
        demand=demand,
        pinned_to=_pinned_host(req, _volumes_host(mounts, view)),
        labels=req.host_labels if isinstance(req.host_labels, dict) else {},
        images=images,
    )


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


def _check_image(reference: str, view: FleetView) -> frozenset[str]:
    """hypeman needs a ready image; vmfleet's hosts pull on demand, so only an image the
    fleet knows and that is *not* ready (pulling, failed) is refused. Returns the names a
    host that has the image ready lists it by: its name, and its digest if known."""
    ref = normalize_reference(reference)
    record = view.images.get(image_key(ref.name))
    if record is not None and record.status is not ImageStatus.READY:
        raise BadRequest(
            f"image not ready: image status is {record.status.value}", code="image_not_ready"
        )
    digests = {ref.digest, record.digest if record is not None else None}
    return frozenset({ref.name, *(d for d in digests if d)})


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
