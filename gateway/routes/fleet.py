"""vmfleet's fleet extensions to hypeman's API: the hosts that serve it, and draining one."""

from __future__ import annotations

import logging

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.moves import move_instance
from gateway.requests import decode_body, read_body
from gateway.responses import MsgspecResponse
from gateway.service import Gateway, gateway
from schemas.api import DrainRequest, DrainResult, InstanceState
from schemas.clock import utc_now
from schemas.codec import decode_drain_request, encode
from schemas.errors import NotFound, VmfleetError
from schemas.messages import DrainRecord, HostRecord, Standby

__all__ = ["routes"]

log = logging.getLogger(__name__)


def shown(gw: Gateway, host: HostRecord) -> HostRecord:
    return msgspec.structs.replace(host, drained=host.id in gw.view.drains)


async def list_hosts(request: Request) -> Response:
    """Live hosts (those whose heartbeat has not aged out), their capacity, and whether an
    operator drained them, by id."""
    gw = gateway(request)
    return MsgspecResponse([shown(gw, h) for h in gw.view.live_hosts()])


async def drain_host(request: Request) -> Response:
    """No new instance or volume is placed on the host; with ``standby``, its running
    instances are put in standby (one after another); with ``move`` (a vmfleet extension),
    its Standby instances are moved to other hosts (gateway/moves.py)."""
    gw = gateway(request)
    host_id = request.path_params["id"]
    if gw.view.live_host(host_id) is None and host_id not in gw.view.drains:
        raise NotFound(f"host {host_id} not found")
    body = await read_body(request, gw.config.max_json_body_bytes)
    req = decode_body(decode_drain_request, body) if body.strip() else DrainRequest()
    reason = req.reason if isinstance(req.reason, str) else ""
    record = DrainRecord(host=host_id, drained_at=utc_now(), reason=reason)
    kv = await gw.js.key_value(gw.subjects.drains_bucket)
    await kv.put(host_id, encode(record))
    await gw.view.wait_until(lambda: host_id in gw.view.drains, 2.0)
    result = DrainResult(host=host_id, drained=True)
    if req.standby is True:
        await _standby_all(gw, host_id, result)
    if req.move is True:
        await _move_all(gw, host_id, result)
    return MsgspecResponse(result)


async def _move_all(gw: Gateway, host_id: str, result: DrainResult) -> None:
    standby = [
        r
        for r in gw.view.instances.values()
        if r.host == host_id and r.state is InstanceState.STANDBY
    ]
    for record in sorted(standby, key=lambda r: r.id):
        try:
            target, seconds = await move_instance(gw, record)
            result.moved[record.id] = target
            log.info(
                "moved instance %s from %s to %s in %.1fs", record.id, host_id, target, seconds
            )
        except VmfleetError as exc:
            result.errors[record.id] = exc.message


async def _standby_all(gw: Gateway, host_id: str, result: DrainResult) -> None:
    running = [
        r
        for r in gw.view.instances.values()
        if r.host == host_id and r.state is InstanceState.RUNNING
    ]
    for record in sorted(running, key=lambda r: r.id):
        cmd = Standby(
            id=f"drain-{record.id}-{int(utc_now().timestamp())}",
            instance_id=record.id,
            issued_at=utc_now(),
        )
        try:
            await gw.execute(host_id, cmd)
            result.standby.append(record.id)
        except VmfleetError as exc:
            result.errors[record.id] = exc.message


async def undrain_host(request: Request) -> Response:
    gw = gateway(request)
    host_id = request.path_params["id"]
    if host_id not in gw.view.drains:
        raise NotFound(f"host {host_id} is not drained")
    kv = await gw.js.key_value(gw.subjects.drains_bucket)
    await kv.delete(host_id)
    await gw.view.wait_until(lambda: host_id not in gw.view.drains, 2.0)
    return MsgspecResponse(DrainResult(host=host_id, drained=False))


routes = [
    Route("/hosts", list_hosts, methods=["GET"]),
    Route("/hosts/{id}/drain", drain_host, methods=["POST"]),
    Route("/hosts/{id}/drain", undrain_host, methods=["DELETE"]),
]
