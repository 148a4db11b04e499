"""``GET /events``: the fleet's state transitions as SSE (a vmfleet extension).

Each event is one ``StateEvent`` from the states stream: ``id:`` is its stream sequence
and ``data:`` its JSON. ``?instance=`` (id, name or prefix, or the id of an instance
already gone) and ``?host=`` narrow it down. A client that reconnects with
``Last-Event-ID`` gets every event after the one it saw, and none twice; without it
the stream starts with the next transition.
"""

from __future__ import annotations

from anyio.abc import ObjectSendStream
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.requests import bad_request
from gateway.resolve import resolve_instance
from gateway.service import Gateway, gateway
from gateway.sse import EventStream, data_event
from gateway.streams import close_quietly, open_ordered, start_after
from schemas.errors import NotFound
from schemas.subjects import is_valid_token

__all__ = ["routes"]


async def events(request: Request) -> Response:
    gw = gateway(request)
    subject = gw.subjects.state_filter(
        host=_token(request, "host"), instance=_instance(gw, request)
    )
    start = start_after(_last_event_id(request))

    async def produce(out: ObjectSendStream[bytes]) -> None:
        subscription = await open_ordered(gw.js, gw.subjects.states_stream, subject, start)
        try:
            while True:
                msg = await subscription.next_msg(timeout=None)
                await out.send(data_event(msg.data, event_id=msg.metadata.sequence.stream))
        finally:
            await close_quietly(subscription)

    return EventStream(produce, keepalive_s=gw.config.keepalive_s)


def _instance(gw: Gateway, request: Request) -> str | None:
    ref = _token(request, "instance")
    if ref is None:
        return None
    try:
        return resolve_instance(gw.view, ref).id
    except NotFound:
        return ref  # a deleted instance's events are still in the stream


def _token(request: Request, name: str) -> str | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if not is_valid_token(raw):
        raise bad_request(
            f'parameter "{name}" in query has an error: value {raw}: '
            "must not contain spaces, '.', '*' or '>'"
        )
    return raw


def _last_event_id(request: Request) -> int | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise bad_request("Last-Event-ID must be the id of an event this stream sent")
    return int(raw)


routes = [Route("/events", events, methods=["GET"])]
