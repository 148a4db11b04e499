"""Snapshots, forks and snapshot schedules, as hypeman 0.28 has them.

A snapshot lives on the host that took it (its record in KV ``<p>_snapshots`` lists the
hosts holding a copy); taking one, restoring one and forking one are commands to that host.
A fork is a create whose command names the snapshot: its name is claimed fleet-wide first
(400 ``name_conflict`` as for any create), the host checks that it has room (503
``host_full``) and that its VMM and kernel are the snapshot's (409
``snapshot_incompatible``) before any VMM starts. ``POST /instances/{id}/fork`` takes a
snapshot of the instance, forks it and deletes that snapshot again (the fork keeps hard
links of what it uses). A schedule is kept in the instance's record and run by its worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import timedelta
from typing import Final

import anyio
import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.ids import derived_id, new_id
from gateway.moves import fork_host
from gateway.names import claim_name, release_name
from gateway.requests import (
    bad_request,
    decode_body,
    idempotency_key,
    parse_duration,
    query_tags,
    read_body,
    refuse_compression,
)
from gateway.resolve import resolve_instance
from gateway.responses import MsgspecResponse
from gateway.service import Gateway, gateway
from natsbus import live_entries
from schemas.api import Hypervisor, InstanceState, go_duration
from schemas.clock import utc_now
from schemas.errors import Conflict, NotFound, OpTimeout, VmfleetError
from schemas.messages import (
    Create,
    CreateSnapshot,
    DeleteSnapshot,
    InstanceRecord,
    RestoreSnapshot,
    SetSnapshotSchedule,
)
from schemas.snapshots import (
    MIN_SCHEDULE_INTERVAL_S,
    CreateSnapshotRequest,
    ForkInstanceRequest,
    ForkSnapshotRequest,
    ForkSource,
    RestoreSnapshotRequest,
    ScheduleState,
    SnapshotKind,
    SnapshotRecord,
    SnapshotScheduleRequest,
    TargetState,
    is_valid_snapshot_id,
)

__all__ = ["routes"]

_create_decoder: Final = msgspec.json.Decoder(CreateSnapshotRequest)
_fork_instance_decoder: Final = msgspec.json.Decoder(ForkInstanceRequest)
_fork_snapshot_decoder: Final = msgspec.json.Decoder(ForkSnapshotRequest)
_restore_decoder: Final = msgspec.json.Decoder(RestoreSnapshotRequest)
_schedule_decoder: Final = msgspec.json.Decoder(SnapshotScheduleRequest)
_record_decoder: Final = msgspec.json.Decoder(SnapshotRecord)

#: The state a fork of an instance ends in by default: the source's.
_FORKABLE: Final = {
    InstanceState.RUNNING: SnapshotKind.STANDBY,
    InstanceState.STANDBY: SnapshotKind.STANDBY,
    InstanceState.STOPPED: SnapshotKind.STOPPED,
}


# -- snapshots ---------------------------------------------------------------------------------


async def create_snapshot(request: Request) -> Response:
    gw = gateway(request)
    req = decode_body(_create_decoder.decode, await _body(gw, request))
    refuse_compression(req.compression)
    record = resolve_instance(gw.view, request.path_params["id"])
    key = idempotency_key(request)
    snapshot = await _take(
        gw,
        record,
        kind=req.kind,
        name=req.name or None,
        tags=req.tags or {},
        snapshot_id=derived_id("snapshot", key) if key else new_id(),
        command_id=key or new_id(),
    )
    return MsgspecResponse(snapshot.to_api(), status_code=201)


async def _take(
    gw: Gateway,
    record: InstanceRecord,
    *,
    kind: SnapshotKind,
    name: str | None,
    tags: dict[str, str],
    snapshot_id: str,
    command_id: str,
) -> SnapshotRecord:
    cmd = CreateSnapshot(
        id=command_id,
        issued_at=utc_now(),
        instance_id=record.id,
        snapshot_id=snapshot_id,
        kind=kind,
        name=name,
        tags=tags,
    )
    await gw.execute(record.host, cmd)
    return await _read(gw, snapshot_id)


async def list_snapshots(request: Request) -> Response:
    gw = gateway(request)
    params = request.query_params
    kind = params.get("kind")
    if kind is not None and kind not in SnapshotKind.__members__.values():
        raise bad_request(f"invalid kind {kind!r}: must be Standby or Stopped")
    name, source = params.get("name"), params.get("source_instance_id")
    tags = query_tags(request)
    found = [
        record
        for record in await _all(gw)
        if (kind is None or record.kind == kind)
        and (name is None or record.name == name)
        and (source is None or record.source.id == source)
        and record.has_tags(tags)
    ]
    found.sort(key=lambda r: (r.created_at, r.id))
    return MsgspecResponse([record.to_api() for record in found])


async def get_snapshot(request: Request) -> Response:
    gw = gateway(request)
    return MsgspecResponse((await _read(gw, request.path_params["snapshot_id"])).to_api())


async def delete_snapshot(request: Request) -> Response:
    """Every host's copy; forks made from it keep what they use."""
    gw = gateway(request)
    record = await _read(gw, request.path_params["snapshot_id"])
    await _delete(gw, record, idempotency_key(request) or new_id())
    return Response(status_code=204)


async def _delete(gw: Gateway, record: SnapshotRecord, command_id: str) -> None:
    for n, host in enumerate(record.hosts):
        cmd = DeleteSnapshot(id=f"{command_id}-{n}", issued_at=utc_now(), snapshot_id=record.id)
        await gw.execute(host, cmd)


async def restore_snapshot(request: Request) -> Response:
    """In place: the instance becomes the snapshot again (same id, name, address)."""
    gw = gateway(request)
    body = await _body(gw, request)
    req = decode_body(_restore_decoder.decode, body) if body.strip() else RestoreSnapshotRequest()
    record = resolve_instance(gw.view, request.path_params["id"])
    snapshot = await _read(gw, request.path_params["snapshot_id"])
    _check_hypervisor(req.target_hypervisor, snapshot)
    if snapshot.source.id != record.id:
        raise Conflict(
            f"snapshot {snapshot.id} is of instance {snapshot.source.name}, not of "
            f"{record.name}: fork it to get an instance of it",
            code="invalid_state",
        )
    if record.host not in snapshot.hosts:
        raise Conflict(f"snapshot {snapshot.id} is not on the instance's host {record.host}")
    cmd = RestoreSnapshot(
        id=idempotency_key(request) or new_id(),
        issued_at=utc_now(),
        instance_id=record.id,
        snapshot_id=snapshot.id,
        target_state=req.target_state or None,
    )
    result = await gw.execute(record.host, cmd, settled=_applied(gw, record.id, cmd.id))
    return MsgspecResponse((result.instance or resolve_instance(gw.view, record.id)).to_api())


# -- forks -------------------------------------------------------------------------------------


async def fork_snapshot(request: Request) -> Response:
    gw = gateway(request)
    req = decode_body(_fork_snapshot_decoder.decode, await _body(gw, request))
    snapshot = await _read(gw, request.path_params["snapshot_id"])
    _check_hypervisor(req.target_hypervisor, snapshot)
    key = idempotency_key(request)
    instance = await _fork(gw, snapshot, req.name, req.target_state or None, key)
    return MsgspecResponse(instance.to_api(), status_code=201)


async def fork_instance(request: Request) -> Response:
    """A snapshot of the instance (a Running one only with ``from_running``: it keeps
    running), a fork of it, and the snapshot deleted again."""
    gw = gateway(request)
    req = decode_body(_fork_instance_decoder.decode, await _body(gw, request))
    record = resolve_instance(gw.view, request.path_params["id"])
    kind = _FORKABLE.get(record.state)
    if kind is None:
        raise Conflict(
            f"cannot fork instance {record.name} in state {record.state.value}: it must be "
            "Running (with from_running), Standby or Stopped",
            code="invalid_state",
        )
    if record.state is InstanceState.RUNNING and not req.from_running:
        raise Conflict(
            f"instance {record.name} is Running: set from_running to fork it (it is paused "
            "only while its memory and disks are copied)",
            code="invalid_state",
        )
    key = idempotency_key(request)
    command_id = key or new_id()
    snapshot = await _take(
        gw,
        record,
        kind=kind,
        name=None,
        tags={"vmfleet.fork-of": record.id},
        snapshot_id=derived_id("fork-snapshot", command_id),
        command_id=f"{command_id}-snapshot",
    )
    target: TargetState = req.target_state or record.state.value  # type: ignore[assignment]
    try:
        instance = await _fork(gw, snapshot, req.name, target, key)
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(VmfleetError):
            await _delete(gw, snapshot, f"{command_id}-cleanup")
    return MsgspecResponse(instance.to_api(), status_code=201)


async def _fork(
    gw: Gateway,
    snapshot: SnapshotRecord,
    name: str,
    target_state: TargetState | None,
    key: str | None,
) -> InstanceRecord:
    instance_id = derived_id("instance", key) if key else new_id()
    if key and (existing := gw.view.instances.get(instance_id)) is not None:
        return existing  # a retried fork
    if not snapshot.hosts:
        raise Conflict(f"snapshot {snapshot.id} is on no host", code="invalid_state")
    cmd = _fork_command(snapshot, name, instance_id, target_state, key or new_id())
    await claim_name(gw, name, instance_id)
    try:
        host = await fork_host(gw, snapshot)  # the snapshot's host, or one it is sent to
        result = await gw.execute(host, cmd, settled=_applied(gw, instance_id, cmd.id))
    except OpTimeout:
        raise  # the command stays queued and may still make the instance: the claim stays
    except BaseException:
        with anyio.CancelScope(shield=True):
            await release_name(gw, name, instance_id)
        raise
    return result.instance or resolve_instance(gw.view, instance_id)


def _fork_command(
    snapshot: SnapshotRecord,
    name: str,
    instance_id: str,
    target_state: TargetState | None,
    command_id: str,
) -> Create:
    source = snapshot.source
    return Create(
        id=command_id,
        issued_at=utc_now(),
        instance_id=instance_id,
        name=name,
        image=source.image,
        image_digest=source.image_digest,
        size_bytes=source.size_bytes,
        hotplug_bytes=source.hotplug_bytes,
        overlay_bytes=source.overlay_bytes,
        disk_io_bps=source.disk_io_bps,
        vcpus=source.vcpus,
        env=dict(source.env),
        network_enabled=source.network_enabled,
        hypervisor=Hypervisor(snapshot.hypervisor),
        cmd=source.cmd,
        entrypoint=source.entrypoint,
        fork=ForkSource(snapshot_id=snapshot.id, target_state=target_state),
    )


def _check_hypervisor(target: str | msgspec.UnsetType, snapshot: SnapshotRecord) -> None:
    """hypeman: another hypervisor only for a Stopped snapshot; vmfleet has each VM's disks
    in one form for both, but a guest booted under one is forked under the same one."""
    if isinstance(target, str) and target != snapshot.hypervisor:
        raise bad_request(
            f"snapshot {snapshot.id} was taken under {snapshot.hypervisor}; "
            f"target_hypervisor {target!r} is not supported"
        )


# -- schedules ---------------------------------------------------------------------------------


async def get_schedule(request: Request) -> Response:
    record = resolve_instance(gateway(request).view, request.path_params["id"])
    return MsgspecResponse(_schedule_api(record, _require_schedule(record)))


async def put_schedule(request: Request) -> Response:
    gw = gateway(request)
    req = decode_body(_schedule_decoder.decode, await _body(gw, request))
    record = resolve_instance(gw.view, request.path_params["id"])
    schedule = _schedule(req, record.snapshot_schedule)
    cmd = SetSnapshotSchedule(
        id=idempotency_key(request) or new_id(),
        issued_at=utc_now(),
        instance_id=record.id,
        schedule=schedule,
    )
    result = await gw.execute(record.host, cmd, settled=_applied(gw, record.id, cmd.id))
    updated = result.instance or resolve_instance(gw.view, record.id)
    return MsgspecResponse(_schedule_api(updated, _require_schedule(updated)))


async def delete_schedule(request: Request) -> Response:
    gw = gateway(request)
    record = resolve_instance(gw.view, request.path_params["id"])
    _require_schedule(record)
    cmd = SetSnapshotSchedule(
        id=idempotency_key(request) or new_id(), issued_at=utc_now(), instance_id=record.id
    )
    await gw.execute(record.host, cmd, settled=_applied(gw, record.id, cmd.id))
    return Response(status_code=204)


def _schedule(req: SnapshotScheduleRequest, current: ScheduleState | None) -> ScheduleState:
    interval_s = _duration("interval", req.interval)
    if interval_s < MIN_SCHEDULE_INTERVAL_S:
        raise bad_request(f"interval must be at least {go_duration(MIN_SCHEDULE_INTERVAL_S)}")
    retention = req.retention
    max_count = retention.max_count if isinstance(retention.max_count, int) else 0
    max_age_s = (
        _duration("retention.max_age", retention.max_age)
        if isinstance(retention.max_age, str)
        else None
    )
    if max_count == 0 and max_age_s is None:
        raise bad_request("retention must set max_count (above 0) or max_age, or both")
    now = utc_now()
    return ScheduleState(
        interval_s=interval_s,
        max_count=max_count,
        max_age_s=max_age_s,
        metadata=req.metadata if isinstance(req.metadata, dict) else {},
        name_prefix=req.name_prefix if isinstance(req.name_prefix, str) else None,
        created_at=current.created_at if current else now,
        updated_at=now,
        next_run_at=now + timedelta(seconds=interval_s),
        last_run_at=current.last_run_at if current else None,
        last_snapshot_id=current.last_snapshot_id if current else None,
        last_error=current.last_error if current else None,
    )


def _duration(field: str, text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise bad_request(f"{field} {text!r} is not a duration (e.g. 90s, 5m, 1h)") from None
    if seconds <= 0:
        raise bad_request(f"{field} must be above zero")
    return seconds


def _require_schedule(record: InstanceRecord) -> ScheduleState:
    if record.snapshot_schedule is None:
        raise NotFound(f"instance {record.name} has no snapshot schedule")
    return record.snapshot_schedule


def _schedule_api(record: InstanceRecord, schedule: ScheduleState) -> object:
    max_age = go_duration(schedule.max_age_s) if schedule.max_age_s is not None else None
    return schedule.to_api(record.id, go_duration(schedule.interval_s), max_age)


# -- helpers -----------------------------------------------------------------------------------


async def _body(gw: Gateway, request: Request) -> bytes:
    return await read_body(request, gw.config.max_json_body_bytes)


async def _bucket(gw: Gateway) -> KeyValue:
    return await gw.js.key_value(gw.subjects.snapshots_bucket)


async def _read(gw: Gateway, snapshot_id: str) -> SnapshotRecord:
    if not is_valid_snapshot_id(snapshot_id):  # never a valid KV key either
        raise NotFound(f"snapshot {snapshot_id} not found")
    try:
        entry = await (await _bucket(gw)).get(snapshot_id)
    except (KeyNotFoundError, ValueError):
        raise NotFound(f"snapshot {snapshot_id} not found") from None
    if entry.value is None:
        raise NotFound(f"snapshot {snapshot_id} not found")
    return _record_decoder.decode(entry.value)


async def _all(gw: Gateway) -> list[SnapshotRecord]:
    entries = await live_entries(gw.js, gw.subjects.snapshots_bucket)
    return [_record_decoder.decode(value) for _, value in entries]


def _applied(gw: Gateway, instance_id: str, command_id: str) -> Callable[[], bool]:
    def probe() -> bool:
        current = gw.view.instances.get(instance_id)
        return current is not None and current.last_command_id == command_id

    return probe


routes = [
    Route("/snapshots", list_snapshots, methods=["GET"]),
    Route("/snapshots/{snapshot_id}", get_snapshot, methods=["GET"]),
    Route("/snapshots/{snapshot_id}", delete_snapshot, methods=["DELETE"]),
    Route("/snapshots/{snapshot_id}/fork", fork_snapshot, methods=["POST"]),
    Route("/instances/{id}/snapshots", create_snapshot, methods=["POST"]),
    Route("/instances/{id}/snapshots/{snapshot_id}/restore", restore_snapshot, methods=["POST"]),
    Route("/instances/{id}/fork", fork_instance, methods=["POST"]),
    Route("/instances/{id}/snapshot-schedule", get_schedule, methods=["GET"]),
    Route("/instances/{id}/snapshot-schedule", put_schedule, methods=["PUT"]),
    Route("/instances/{id}/snapshot-schedule", delete_schedule, methods=["DELETE"]),
]
