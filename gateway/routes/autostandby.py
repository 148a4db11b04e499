"""``GET /instances/{id}/auto-standby/status`` and ``POST /instances/{id}/auto-standby/hold``:
asked of the owning host, whose controller counts the instance's inbound connections and
keeps its idle clock (:mod:`worker.autostandby`).

The hold takes no body and no parameters, as in hypeman; whatever a client sends with it
is ignored.
"""

from __future__ import annotations

from typing import Final

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.resolve import resolve_instance
from gateway.responses import MsgspecResponse
from gateway.service import gateway
from schemas.autostandby import AutoStandbyQuery, AutoStandbyReply, AutoStandbyStatus
from schemas.codec import encode
from schemas.errors import HostUnavailable, VmfleetError, error_from_info

__all__ = ["routes"]

_TIMEOUT_S: Final = 5.0
_REPLY: Final = msgspec.json.Decoder(AutoStandbyReply)
#: The host-query method the owning worker answers (``Subjects.autostandby_query``).
_METHOD: Final = "autostandby"


async def auto_standby_status(request: Request) -> Response:
    return MsgspecResponse(await _ask(request, "status"))


async def auto_standby_hold(request: Request) -> Response:
    return MsgspecResponse(await _ask(request, "hold"))


async def _ask(request: Request, action: str) -> AutoStandbyStatus:
    gw = gateway(request)
    record = resolve_instance(gw.view, request.path_params["id"])
    if gw.view.live_host(record.host) is None:
        raise HostUnavailable(f"host {record.host} is not available to ask about auto-standby")
    query = AutoStandbyQuery(instance_id=record.id, action="hold" if action == "hold" else "status")
    answer = _REPLY.decode(
        await gw.sender.ask_host(record.host, _METHOD, encode(query), timeout_s=_TIMEOUT_S)
    )
    if answer.status is None:
        if answer.error is None:
            raise VmfleetError("the host could not read the instance's auto-standby status")
        raise error_from_info(answer.error)
    return answer.status


routes = [
    Route("/instances/{id}/auto-standby/status", auto_standby_status, methods=["GET"]),
    Route("/instances/{id}/auto-standby/hold", auto_standby_hold, methods=["POST"]),
]
