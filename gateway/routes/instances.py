"""``/instances``: hypeman's instance API, plus vmfleet's ``/wait``.

Reads come from the view. Every change is one command to the instance's host, sent with
the client's ``Idempotency-Key`` as its id when there is one; the response is the record
the worker wrote (hypeman's Instance, with vmfleet's ``host``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.ids import derived_id, new_id
from gateway.logs import logs_stream
from gateway.names import claim_name, release_name, release_name_after_delete
from gateway.plan import CreatePlan, plan_create
from gateway.requests import (
    bad_request,
    decode_body,
    idempotency_key,
    parse_duration,
    query_tags,
    read_body,
    refuse_compression,
)
from gateway.resolve import resolve_instance, resolve_volume
from gateway.responses import JSONBytesResponse, MsgspecResponse
from gateway.service import Gateway, gateway
from gateway.supervision import UPDATE_DECODER, plan_update
from schemas.api import InstanceState, StartInstanceRequest, WaitForStateResponse
from schemas.clock import utc_now
from schemas.codec import (
    decode_attach_volume_request,
    decode_create_instance_request,
    decode_start_instance_request,
)
from schemas.errors import Conflict, NotFound, OpTimeout, VmfleetError
from schemas.messages import (
    AttachVolume,
    CommandResult,
    Delete,
    DetachVolume,
    InstanceRecord,
    Restore,
    Standby,
    Start,
    Stop,
    Update,
)
from schemas.snapshots import StandbyRequest

__all__ = ["hot_routes", "routes"]

#: The states ``/wait`` accepts: hypeman's, with the newer SDK's ``Initializing``.
_WAIT_STATES: Final = tuple(s.value for s in InstanceState)
#: Initializing passes in a moment: a wait for it is also over once the guest is Running.
_PAST: Final = {InstanceState.INITIALIZING: frozenset({InstanceState.RUNNING})}


# -- reads -----------------------------------------------------------------------------------


async def list_instances(request: Request) -> Response:
    """Every instance, by id; ``?state=`` and ``?tags[k]=v`` (all pairs) filter, as the
    newer SDK sends them."""
    view = gateway(request).view
    keys = view.matching(request.query_params.get("state"), query_tags(request))
    return JSONBytesResponse(b"[" + b",".join(view.instance_json(key) for key in keys) + b"]")


async def get_instance(request: Request) -> Response:
    view = gateway(request).view
    return JSONBytesResponse(
        view.instance_json(resolve_instance(view, request.path_params["id"]).id)
    )


# -- create and delete -------------------------------------------------------------------------


async def create_instance(request: Request) -> Response:
    """Check, place, send Create, answer 201 with the running instance."""
    gw = gateway(request)
    body = await read_body(request, gw.config.max_json_body_bytes)
    req = decode_body(decode_create_instance_request, body)
    key = idempotency_key(request)
    instance_id = derived_id("instance", key) if key else new_id()
    if key and (existing := gw.view.instances.get(instance_id)) is not None:
        return MsgspecResponse(existing.to_api(), status_code=201)  # a retried create
    plan = plan_create(
        req, gw.view, command_id=key or new_id(), instance_id=instance_id, issued_at=utc_now()
    )
    _place(gw, plan)  # a create no host can take is refused before its name is claimed
    await claim_name(gw, req.name, instance_id)
    try:
        result = await _place_and_create(gw, plan, instance_id)
    except OpTimeout:
        raise  # the command stays queued and may still make the instance: the claim stays
    except BaseException:
        with anyio.CancelScope(shield=True):
            await release_name(gw, req.name, instance_id)
        raise
    return MsgspecResponse(_rendered(gw, result.instance, instance_id), status_code=201)


def _place(gw: Gateway, plan: CreatePlan, refused: frozenset[str] = frozenset()) -> str:
    return gw.placement.instance_host(
        plan.demand,
        pinned_to=plan.pinned_to,
        labels=plan.labels,
        exclude=refused,
        images=plan.images,
    )


async def _place_and_create(gw: Gateway, plan: CreatePlan, instance_id: str) -> CommandResult:
    """Place, send, and if the host refuses as full or its host port as taken (another
    gateway got there since its last heartbeat, or something else bound the port), place
    again elsewhere, a few times, each try its own command. A create pinned to a host
    (``host``, or its volumes' host) has nowhere else to go: the refusal is the answer."""
    refused: frozenset[str] = frozenset()
    for attempt in range(_PLACEMENT_TRIES):
        host = _place(gw, plan, refused)
        command = plan.command
        if attempt:
            command = msgspec.structs.replace(command, id=f"{command.id}-{attempt}")
        try:
            with gw.placement.reserved(host, plan.demand):
                return await gw.execute(
                    host, command, settled=_applied(gw, instance_id, command.id)
                )
        except VmfleetError as exc:
            last_try = attempt == _PLACEMENT_TRIES - 1
            if exc.code not in _TRY_ELSEWHERE or plan.pinned_to is not None or last_try:
                raise
            refused |= {host}
    raise AssertionError("unreachable")


_PLACEMENT_TRIES = 3
#: A host's refusals that another host may not share.
_TRY_ELSEWHERE: Final = frozenset({"host_full", "port_in_use"})


async def delete_instance(request: Request) -> Response:
    gw = gateway(request)
    record = resolve_instance(gw.view, request.path_params["id"])
    cmd = Delete(id=_command_id(request), instance_id=record.id, issued_at=utc_now())
    await gw.execute(record.host, cmd, settled=lambda: record.id not in gw.view.instances)
    await release_name_after_delete(gw, record.name, record.id)
    return Response(status_code=204)


# -- lifecycle ---------------------------------------------------------------------------------


async def update_instance(request: Request) -> Response:
    """PATCH: what changes without touching the VM, applied by the owning worker."""
    gw = gateway(request)
    record = resolve_instance(gw.view, request.path_params["id"])
    body = await read_body(request, gw.config.max_json_body_bytes)
    req = decode_body(UPDATE_DECODER.decode, body)
    host = gw.view.live_host(record.host)
    cmd = plan_update(
        req,
        record,
        command_id=_command_id(request),
        now=utc_now(),
        user_mode=host is not None and host.network_mode == "user",
    )
    return await _run(gw, record, cmd)


async def start_instance(request: Request) -> Response:
    gw = gateway(request)
    record = resolve_instance(gw.view, request.path_params["id"])
    body = await read_body(request, gw.config.max_json_body_bytes)
    overrides = (
        decode_body(decode_start_instance_request, body) if body.strip() else StartInstanceRequest()
    )
    cmd = Start(
        id=_command_id(request),
        instance_id=record.id,
        issued_at=utc_now(),
        cmd=overrides.cmd if isinstance(overrides.cmd, list) else None,
        entrypoint=overrides.entrypoint if isinstance(overrides.entrypoint, list) else None,
    )
    return await _run(gw, record, cmd)


async def stop_instance(request: Request) -> Response:
    return await _simple(request, Stop)


async def standby_instance(request: Request) -> Response:
    """hypeman's optional body: compression is refused (vmfleet's saved memory stays
    uncompressed), a well-formed ``compression_delay`` is moot without it."""
    gw = gateway(request)
    record = resolve_instance(gw.view, request.path_params["id"])
    body = await read_body(request, gw.config.max_json_body_bytes)
    if body.strip():
        req = decode_body(_standby_decoder.decode, body)
        refuse_compression(req.compression)
        if isinstance(req.compression_delay, str):
            _check_duration("compression_delay", req.compression_delay)
    cmd = Standby(id=_command_id(request), instance_id=record.id, issued_at=utc_now())
    return await _run(gw, record, cmd)


_standby_decoder = msgspec.json.Decoder(StandbyRequest)


def _check_duration(field: str, text: str) -> None:
    try:
        parse_duration(text)
    except ValueError:
        raise bad_request(f"{field} {text!r} is not a duration such as 30s or 5m") from None


async def restore_instance(request: Request) -> Response:
    return await _simple(request, Restore)


async def _simple(request: Request, op: type[Stop | Restore]) -> Response:
    """An op without parameters; a body, if any, is ignored as hypeman does."""
    gw = gateway(request)
    record = resolve_instance(gw.view, request.path_params["id"])
    return await _run(
        gw, record, op(id=_command_id(request), instance_id=record.id, issued_at=utc_now())
    )


async def _run(
    gw: Gateway,
    record: InstanceRecord,
    cmd: Start | Stop | Standby | Restore | Update | AttachVolume | DetachVolume,
) -> Response:
    result = await gw.execute(record.host, cmd, settled=_applied(gw, record.id, cmd.id))
    return MsgspecResponse(_rendered(gw, result.instance, record.id))


# -- volumes ---------------------------------------------------------------------------------


async def attach_volume(request: Request) -> Response:
    """Attach a volume of the instance's own host (hot on a running VM)."""
    gw = gateway(request)
    record = resolve_instance(gw.view, request.path_params["id"])
    volume = resolve_volume(gw.view, request.path_params["volumeId"])
    body = decode_body(
        decode_attach_volume_request, await read_body(request, gw.config.max_json_body_bytes)
    )
    if volume.host != record.host:
        raise Conflict(
            f"volume {volume.id} is on host {volume.host}, instance {record.id} on host "
            f"{record.host}; a volume can only be attached on its own host",
            code="volume_on_other_host",
        )
    cmd = AttachVolume(
        id=_command_id(request),
        instance_id=record.id,
        issued_at=utc_now(),
        volume_id=volume.id,
        mount_path=body.mount_path,
        readonly=body.readonly,
    )
    return await _run(gw, record, cmd)


async def detach_volume(request: Request) -> Response:
    gw = gateway(request)
    record = resolve_instance(gw.view, request.path_params["id"])
    volume = resolve_volume(gw.view, request.path_params["volumeId"])
    cmd = DetachVolume(
        id=_command_id(request), instance_id=record.id, issued_at=utc_now(), volume_id=volume.id
    )
    return await _run(gw, record, cmd)


# -- logs and waiting --------------------------------------------------------------------------


async def instance_logs(request: Request) -> Response:
    gw = gateway(request)
    record = resolve_instance(gw.view, request.path_params["id"])
    return await logs_stream(gw, request, record.id)


async def wait_for_state(request: Request) -> Response:
    """Return once the instance is in ``state``, has failed (Unknown), or time is up;
    woken by the view's updates, never by polling. 404 if it is deleted meanwhile."""
    gw = gateway(request)
    record = resolve_instance(gw.view, request.path_params["id"])
    target = _wait_target(request)
    timeout = _wait_timeout(request, gw)

    def outcome() -> str | None:
        current = gw.view.instances.get(record.id)
        if current is None:
            return "gone"
        reached = {target, InstanceState.UNKNOWN, *_PAST.get(target, ())}
        if current.state in reached:
            return "reached"
        return None

    settled = await gw.view.wait_until(outcome, timeout)
    current = gw.view.instances.get(record.id)
    if current is None:
        raise NotFound("instance was deleted while waiting")
    return MsgspecResponse(
        WaitForStateResponse(
            state=current.state, state_error=current.state_error, timed_out=settled is None
        )
    )


def _wait_target(request: Request) -> InstanceState:
    raw = request.query_params.get("state")
    if raw is None:
        raise bad_request('parameter "state" in query has an error: value is required but missing')
    if raw not in _WAIT_STATES:
        raise bad_request(
            f'parameter "state" in query has an error: value {raw}: '
            f"value is not one of the allowed values {list(_WAIT_STATES)}"
        )
    return InstanceState(raw)


def _wait_timeout(request: Request, gw: Gateway) -> float:
    raw = request.query_params.get("timeout")
    if raw is None:
        return gw.config.wait_default_s
    try:
        seconds = parse_duration(raw)
    except ValueError:
        raise bad_request(
            f'parameter "timeout" in query has an error: value {raw}: '
            'not a duration such as "30s" or "2m"'
        ) from None
    return min(seconds, gw.config.wait_max_s) if math.isfinite(seconds) else gw.config.wait_max_s


# -- helpers ---------------------------------------------------------------------------------


def _command_id(request: Request) -> str:
    return idempotency_key(request) or new_id()


def _applied(gw: Gateway, instance_id: str, command_id: str) -> Callable[[], bool]:
    """Whether this replica's view shows the instance as ``command_id`` left it."""

    def probe() -> bool:
        current = gw.view.instances.get(instance_id)
        return current is not None and current.last_command_id == command_id

    return probe


def _rendered(gw: Gateway, record: InstanceRecord | None, instance_id: str) -> object:
    """The result's record, or (a redelivered command answered without one) the view's."""
    if record is None:
        record = resolve_instance(gw.view, instance_id)
    return record.to_api()


#: The most frequent request, routed ahead of the rest of the table (Starlette tries the
#: routes in order; a dozen failed matches were a fifth of what a read cost). Nothing before
#: it in the app's table matches its paths, so the order changes no answer.
hot_routes = [Route("/instances/{id}", get_instance, methods=["GET"])]

routes = [
    Route("/instances", list_instances, methods=["GET"]),
    Route("/instances", create_instance, methods=["POST"]),
    Route("/instances/{id}", delete_instance, methods=["DELETE"]),
    Route("/instances/{id}", update_instance, methods=["PATCH"]),
    Route("/instances/{id}/start", start_instance, methods=["POST"]),
    Route("/instances/{id}/stop", stop_instance, methods=["POST"]),
    Route("/instances/{id}/standby", standby_instance, methods=["POST"]),
    Route("/instances/{id}/restore", restore_instance, methods=["POST"]),
    Route("/instances/{id}/logs", instance_logs, methods=["GET"]),
    Route("/instances/{id}/wait", wait_for_state, methods=["GET"]),
    Route("/instances/{id}/volumes/{volumeId}", attach_volume, methods=["POST"]),
    Route("/instances/{id}/volumes/{volumeId}", detach_volume, methods=["DELETE"]),
]
