"""``GET /instances/{id}/logs``: an instance's log lines from the logs stream, as SSE.

The lines come from JetStream, not from the host, so any replica serves them and they
stay readable while the host is down. ``tail=N`` sends exactly the last N lines; with
``follow`` the same ordered consumer goes on with every later line (no gap, no repeat),
across stops, standbys and restores, until the client leaves or the instance is deleted.
hypeman's ``source=hypeman`` is vmfleet's ``ops`` log.
"""

from __future__ import annotations

import logging
import math
from typing import Final

import anyio
import msgspec
from anyio.abc import ObjectSendStream
from nats.errors import TimeoutError as NatsTimeoutError
from starlette.requests import Request

from gateway.requests import bad_request, query_bool, query_int
from gateway.service import Gateway
from gateway.sse import EventStream, data_event, go_json_string
from gateway.streams import (
    PushSubscription,
    StartPoint,
    close_quietly,
    find_tail_start,
    open_ordered,
)
from gateway.view import FleetView
from schemas.codec import decode_log_line

__all__ = ["SOURCES", "logs_stream"]

log = logging.getLogger(__name__)

#: hypeman's ``source`` values and the vmfleet log each one reads.
SOURCES: Final = {"app": "app", "vmm": "vmm", "hypeman": "ops"}
DEFAULT_TAIL: Final = 100
#: After the instance is deleted, lines still on their way get this long to arrive.
_DELETE_GRACE_S: Final = 0.5
#: A non-follow read gives up waiting for its backlog after this long (lines aged out).
_BACKLOG_IDLE_S: Final = 5.0


async def logs_stream(gw: Gateway, request: Request, instance_id: str) -> EventStream:
    """Check the query, find where the tail starts, and return the stream to send."""
    tail = query_int(request, "tail", DEFAULT_TAIL)
    follow = query_bool(request, "follow", False)
    source = _source(request)
    subject = gw.subjects.logs(instance_id, source)
    start = await find_tail_start(gw.js, gw.subjects.logs_stream, subject, tail)

    async def produce(events: ObjectSendStream[bytes]) -> None:
        if not follow and start.backlog == 0:
            return
        subscription = await open_ordered(gw.js, gw.subjects.logs_stream, subject, start)
        try:
            if follow:
                await _follow(subscription, events, gw.view, instance_id)
            else:
                await _relay_backlog(subscription, events, start)
        finally:
            await close_quietly(subscription)

    return EventStream(produce, keepalive_s=gw.config.keepalive_s)


def _source(request: Request) -> str:
    raw = request.query_params.get("source", "app")
    if raw not in SOURCES:
        raise bad_request(
            f'parameter "source" in query has an error: value {raw}: '
            'value is not one of the allowed values ["app","vmm","hypeman"]'
        )
    return SOURCES[raw]


async def _relay_backlog(
    subscription: PushSubscription, events: ObjectSendStream[bytes], start: StartPoint
) -> None:
    """The ``start.backlog`` lines, and no more (later lines are for a follow)."""
    for _ in range(start.backlog):
        try:
            msg = await subscription.next_msg(timeout=_BACKLOG_IDLE_S)
        except NatsTimeoutError:
            return
        await _send_line(events, msg.data)
        if msg.metadata.num_pending == 0:
            return


async def _follow(
    subscription: PushSubscription,
    events: ObjectSendStream[bytes],
    view: FleetView,
    instance_id: str,
) -> None:
    """Every line, until the instance is gone from the view (plus a short grace)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_cancel_when_deleted, view, instance_id, tg.cancel_scope)
        while True:
            msg = await subscription.next_msg(timeout=None)
            await _send_line(events, msg.data)


async def _cancel_when_deleted(view: FleetView, instance_id: str, scope: anyio.CancelScope) -> None:
    await view.wait_until(lambda: instance_id not in view.instances, math.inf)
    await anyio.sleep(_DELETE_GRACE_S)
    scope.cancel()


async def _send_line(events: ObjectSendStream[bytes], payload: bytes) -> None:
    try:
        line = decode_log_line(payload).line
    except (msgspec.ValidationError, msgspec.DecodeError):
        log.warning("skipping an undecodable log message")
        return
    await events.send(data_event(go_json_string(line)))
