"""vmfleet's fleet extensions to hypeman's API: the hosts that serve it."""

from __future__ import annotations

from nats.js.errors import NoKeysError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.responses import MsgspecResponse
from schemas.codec import decode_host_record
from schemas.messages import HostRecord
from schemas.subjects import Subjects

__all__ = ["routes"]


async def list_hosts(request: Request) -> Response:
    """Live hosts (those whose heartbeat has not aged out) and their capacity, by id."""
    config = request.app.state.config
    kv = await request.app.state.nats.jetstream().key_value(
        Subjects(config.subject_prefix).hosts_bucket
    )
    try:
        keys = sorted(await kv.keys())
    except NoKeysError:
        keys = []
    hosts: list[HostRecord] = []
    for key in keys:
        entry = await kv.get(key)
        if entry.value:
            hosts.append(decode_host_record(entry.value))
    return MsgspecResponse(hosts)


routes = [Route("/hosts", list_hosts, methods=["GET"])]
