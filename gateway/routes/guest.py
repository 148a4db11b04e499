"""Inside a guest: ``/instances/{id}/exec`` and ``/instances/{id}/cp`` (WebSockets with
hypeman's frame protocols) and ``/instances/{id}/stat`` (hypeman's PathInfo).

Everything a client can be refused for is refused before the upgrade, with hypeman's
error JSON: no or a bad token (401) and a token without the ``exec`` scope (403) in
``gateway.auth``; here an unknown or ambiguous id (404/409) and an instance that is not
Running (409 ``invalid_state``). After the upgrade, the owning host's refusals and
failures arrive the way hypeman sends them (``gateway.sessions``).
"""

from __future__ import annotations

from typing import Final

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from gateway.resolve import resolve_instance
from gateway.responses import MsgspecResponse, error_response
from gateway.service import Gateway
from gateway.sessions import GuestSessions
from schemas.api import InstanceState
from schemas.errors import BadRequest, HostUnavailable, InvalidState, VmfleetError
from schemas.messages import InstanceRecord
from schemas.sessions import SessionKind

__all__ = ["routes"]

_TRUE: Final = frozenset({"true", "1"})
_FALSE: Final = frozenset({"false", "0"})


async def exec_session(ws: WebSocket) -> None:
    await _session(ws, "exec")


async def cp_session(ws: WebSocket) -> None:
    await _session(ws, "cp")


async def _session(ws: WebSocket, kind: SessionKind) -> None:
    try:
        sessions, record = _running_instance(ws)
    except VmfleetError as exc:
        await ws.send_denial_response(error_response(exc))
        return
    await ws.accept()
    subject = str(ws.scope.get("state", {}).get("subject", ""))
    await sessions.relay(ws, host=record.host, instance_id=record.id, kind=kind, subject=subject)


async def upgrade_required(request: Request) -> Response:
    """A plain GET on a WebSocket endpoint (hypeman's spec describes them as GETs)."""
    _running_instance(request)
    raise BadRequest(
        f"{request.url.path} speaks WebSocket: send an Upgrade request", code="bad_request"
    )


async def stat_path(request: Request) -> Response:
    sessions, record = _running_instance(request)
    path = request.query_params.get("path")
    if not path:
        raise BadRequest("query parameter 'path' is required", code="bad_request")
    info = await sessions.stat(
        host=record.host,
        instance_id=record.id,
        path=path,
        follow_links=_flag(request.query_params.get("follow_links"), "follow_links"),
    )
    return MsgspecResponse(info)


def _running_instance(conn: HTTPConnection) -> tuple[GuestSessions, InstanceRecord]:
    """The session relay and the instance ``{id}`` names, which must be Running."""
    gw = getattr(conn.app.state, "gateway", None)
    sessions = getattr(conn.app.state, "guest_sessions", None)
    if not isinstance(gw, Gateway) or not isinstance(sessions, GuestSessions):
        raise HostUnavailable("the gateway is not connected to NATS yet")
    record = resolve_instance(gw.view, conn.path_params["id"])
    state = gw.view.effective_state(record.id)
    if state is not InstanceState.RUNNING:
        raise InvalidState(f"instance must be running (current state: {state.value})")
    return sessions, record


def _flag(value: str | None, name: str) -> bool:
    if value is None or value.lower() in _FALSE:
        return False
    if value.lower() in _TRUE:
        return True
    raise BadRequest(f"query parameter '{name}' must be true or false", code="bad_request")


routes: list[BaseRoute] = [
    WebSocketRoute("/instances/{id}/exec", exec_session),
    WebSocketRoute("/instances/{id}/cp", cp_session),
    Route("/instances/{id}/exec", upgrade_required, methods=["GET"]),
    Route("/instances/{id}/cp", upgrade_required, methods=["GET"]),
    Route("/instances/{id}/stat", stat_path, methods=["GET"]),
]
