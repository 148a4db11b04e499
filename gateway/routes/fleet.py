"""vmfleet's fleet extensions to hypeman's API: the hosts that serve it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.responses import MsgspecResponse
from gateway.service import gateway

__all__ = ["routes"]


async def list_hosts(request: Request) -> Response:
    """Live hosts (those whose heartbeat has not aged out) and their capacity, by id."""
    return MsgspecResponse(gateway(request).view.live_hosts())


routes = [Route("/hosts", list_hosts, methods=["GET"])]
