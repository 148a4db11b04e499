"""Server-sent events: hypeman's wire format and a response that streams until done.

Wire format (reference §3.3): one ``data: <JSON string>\\n\\n`` event per log line, the
string encoded as Go's ``encoding/json`` does it, HTML-escaping included (``<`` becomes
``\\u003c``), because clients compare the bytes. Keep-alives are SSE comment lines
(``: keep-alive``), which the SDK's decoder skips; an event with empty data would make it
call ``json.loads("")``.

:class:`EventStream` is a plain ASGI response. Its producer runs in a task group owned by
the response, next to a task that notices the client leaving, and hands it encoded
events through a memory stream; nothing straddles an async generator's ``yield``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

import anyio
import msgspec
from anyio.abc import ObjectSendStream
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = ["KEEPALIVE", "EventStream", "Producer", "data_event", "go_json_string"]

log = logging.getLogger(__name__)

KEEPALIVE: Final = b": keep-alive\n\n"
_HEADERS: Final = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
]
# What Go's json.Marshal escapes and msgspec leaves as is (both escape the rest alike:
# quote, backslash, \n \r \t \b \f, other control characters as \u00XX).
_GO_ESCAPES: Final = (
    (b"<", b"\\u003c"),
    (b">", b"\\u003e"),
    (b"&", b"\\u0026"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)

#: Writes encoded events to the stream it is given, and returns when the stream is done.
Producer = Callable[[ObjectSendStream[bytes]], Awaitable[None]]


def go_json_string(text: str) -> bytes:
    """``text`` as Go's ``json.Marshal`` writes a string."""
    encoded = msgspec.json.encode(text)
    for raw, escaped in _GO_ESCAPES:
        if raw in encoded:
            encoded = encoded.replace(raw, escaped)
    return encoded


def data_event(payload: bytes, *, event_id: int | None = None) -> bytes:
    """One SSE event carrying one line of JSON, optionally with an ``id:``."""
    head = b"" if event_id is None else b"id: %d\n" % event_id
    return head + b"data: " + payload + b"\n\n"


class EventStream(Response):
    """A ``text/event-stream`` response fed by ``produce``; ends when it returns, or when
    the client disconnects (the producer is then cancelled).

    A Response subclass only so that routes can return it; it renders nothing up front.
    """

    media_type = "text/event-stream"

    def __init__(self, produce: Producer, *, keepalive_s: float) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = list(_HEADERS)
        self._produce = produce
        self._keepalive_s = keepalive_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        events_in, events_out = anyio.create_memory_object_stream[bytes](64)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
            tg.start_soon(self._run_producer, events_in)
            await self._relay(events_out, send)
            tg.cancel_scope.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _run_producer(self, events: ObjectSendStream[bytes]) -> None:
        async with events:
            try:
                await self._produce(events)
            except Exception:
                # The status line is sent: all that is left to do is end the stream.
                log.exception("event stream producer failed; ending the stream")

    async def _relay(self, events: anyio.abc.ObjectReceiveStream[bytes], send: Send) -> None:
        async with events:
            while True:
                chunk = b""
                with anyio.move_on_after(self._keepalive_s):
                    try:
                        chunk = await events.receive()
                    except anyio.EndOfStream:
                        return
                await send(
                    {"type": "http.response.body", "body": chunk or KEEPALIVE, "more_body": True}
                )


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
