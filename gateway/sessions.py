"""The gateway's half of guest sessions: a client's exec or cp WebSocket relayed to the
worker that owns the instance over NATS, and stat as one request.

The transport is described in ``schemas.sessions``. The gateway never looks inside a
session's frames except to find the two things that are the host side's to handle:
the request's ``wait_for_agent`` (how long the open may take) and vmfleet's end-of-input
frame ``{"eof":true}`` (exec only; hypeman's SDK never sends it, ``vmfleet exec -i`` does
when its stdin ends).

Memory stays bounded: the gateway reads the next client frame only while it holds credit
from the worker, and grants the worker credit only as frames are written to the client's
socket, whose sends wait while the client does not read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from typing import Final

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from starlette.websockets import WebSocket, WebSocketDisconnect

from schemas.errors import HostUnavailable, VmfleetError, error_from_info
from schemas.sessions import (
    IDLE_TIMEOUT_S,
    MAX_CHUNK_BYTES,
    MAX_TEXT_BYTES,
    PING_INTERVAL_S,
    WINDOW_BYTES,
    PathInfo,
    SessionFrame,
    SessionKind,
    SessionOpen,
    SessionOpened,
    StatRequest,
    decode_frame,
    decode_session_opened,
    decode_stat_reply,
    encode_session,
)
from schemas.subjects import Subjects

__all__ = ["EOF_FRAME", "GuestSessions"]

log = logging.getLogger(__name__)

#: vmfleet's end-of-input frame for exec (a TEXT frame with exactly this JSON value).
EOF_FRAME: Final = {"eof": True}
#: How long a host may take to open a session beyond the client's ``wait_for_agent``.
OPEN_TIMEOUT_S: Final = 15.0
MAX_WAIT_FOR_AGENT_S: Final = 300.0
STAT_TIMEOUT_S: Final = 40.0


class GuestSessions:
    """Built once in the app's lifespan; one :meth:`relay` per client WebSocket."""

    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self._nc = nc
        self._subjects = subjects

    async def relay(
        self, ws: WebSocket, *, host: str, instance_id: str, kind: SessionKind, subject: str
    ) -> None:
        """Serve one accepted WebSocket until the session ends either way."""
        first = await _receive(ws)
        if first is None:
            return
        text, data = first
        if text and len(data) > MAX_TEXT_BYTES:
            await _refuse(ws, kind, "the request frame is larger than 512 KiB")
            return
        session_id = secrets.token_hex(12)
        try:
            out = await self._nc.subscribe(self._subjects.session_out(host, session_id))
        except nats.errors.Error as exc:
            await _refuse(ws, kind, f"the fleet's message bus did not answer: {exc!r}")
            return
        try:
            request = SessionOpen(
                session_id=session_id,
                instance_id=instance_id,
                kind=kind,
                subject=subject,
                window=WINDOW_BYTES,
                first=data,
                first_text=text,
            )
            try:
                opened = await self._open(host, request, _wait_for_agent(kind, text, data))
            except VmfleetError as exc:
                await _refuse(ws, kind, exc.message)
                return
            if not opened.ok:
                message = opened.error.message if opened.error else "the host refused the session"
                await _refuse(ws, kind, message)
                return
            inbound = self._subjects.session_in(host, session_id)
            await _Relay(self._nc, ws, kind, host, inbound, opened.window).run(out)
        finally:
            with anyio.CancelScope(shield=True):
                await _unsubscribe_quietly(out)

    async def _open(self, host: str, request: SessionOpen, wait_s: float) -> SessionOpened:
        try:
            reply = await self._nc.request(
                self._subjects.session_open(host),
                encode_session(request),
                timeout=wait_s + OPEN_TIMEOUT_S,
            )
        except (NoRespondersError, NatsTimeoutError):
            raise HostUnavailable(f"host {host} is not answering") from None
        except nats.errors.Error as exc:
            raise HostUnavailable(f"the fleet's message bus did not answer: {exc!r}") from None
        return decode_session_opened(reply.data)

    async def stat(self, *, host: str, instance_id: str, path: str, follow_links: bool) -> PathInfo:
        """hypeman's PathInfo of ``path`` in the guest, or the host's error."""
        request = StatRequest(instance_id=instance_id, path=path, follow_links=follow_links)
        try:
            reply = await self._nc.request(
                self._subjects.stat_query(host), encode_session(request), timeout=STAT_TIMEOUT_S
            )
        except (NoRespondersError, NatsTimeoutError):
            raise HostUnavailable(f"host {host} is not answering") from None
        answer = decode_stat_reply(reply.data)
        if answer.info is None:
            if answer.error is None:
                raise VmfleetError("failed to stat path in guest")
            raise error_from_info(answer.error)
        return answer.info


class _Relay:
    """One open session: client → NATS ``in``, NATS ``out`` → client, pings, and its end."""

    def __init__(
        self, nc: Client, ws: WebSocket, kind: SessionKind, host: str, inbound: str, window: int
    ) -> None:
        self._nc = nc
        self._ws = ws
        self._kind = kind
        self._host = host
        self._in = inbound
        self._credit = window  # what the worker lets us send
        self._credit_granted = anyio.Event()
        self._owed = 0  # bytes written to the client, not yet granted back to the worker
        self._heard = time.monotonic()
        self._ended = False
        self._to_worker: SessionFrame | None = None
        self._to_client: str | None = None  # an error message for the client
        self._exited = False  # exec: the exit code went out, nothing else may follow
        self._scope = anyio.CancelScope()

    async def run(self, out: Subscription) -> None:
        with self._scope:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._from_client)
                    tg.start_soon(self._from_worker, out)
                    tg.start_soon(self._keep_alive)
            finally:
                if not self._ended:  # the gateway is stopping
                    self._to_worker = SessionFrame("error", message="the gateway is stopping")
                    self._to_client = "the gateway is stopping"
                with anyio.CancelScope(shield=True):
                    await self._finish()

    async def _finish(self) -> None:
        if self._to_worker is not None:
            await self._publish(self._to_worker)
        if self._to_client is not None and not self._exited:
            await _refuse(self._ws, self._kind, self._to_client)
        else:
            await _close(self._ws)

    def _end(self, *, to_worker: SessionFrame | None, to_client: str | None) -> None:
        if not self._ended:
            self._ended = True
            self._to_worker = to_worker
            self._to_client = to_client
            self._scope.cancel()

    async def _publish(self, frame: SessionFrame) -> None:
        try:
            await self._nc.publish(self._in, encode_session(frame))
        except nats.errors.Error as exc:  # the worker's idle timeout ends its side
            message = f"the fleet's message bus failed: {exc!r}"
            self._end(to_worker=None, to_client=message)

    # -- client → worker ---------------------------------------------------------------------

    async def _from_client(self) -> None:
        while True:
            await self._wait_for_credit()
            received = await _receive(self._ws)
            if received is None:  # the client went away: abort the command
                self._end(to_worker=SessionFrame("close"), to_client=None)
                return
            text, data = received
            if text:
                if len(data) > MAX_TEXT_BYTES:
                    message = "a text frame larger than 512 KiB"
                    self._end(to_worker=SessionFrame("error", message=message), to_client=message)
                    return
                eof = self._kind == "exec" and _is_eof(data)
                await self._send(SessionFrame("eof") if eof else SessionFrame("text", data))
                continue
            for start in range(0, len(data), MAX_CHUNK_BYTES):
                await self._wait_for_credit()
                await self._send(SessionFrame("binary", data[start : start + MAX_CHUNK_BYTES]))

    async def _wait_for_credit(self) -> None:
        while self._credit <= 0:
            self._credit_granted = anyio.Event()
            await self._credit_granted.wait()

    async def _send(self, frame: SessionFrame) -> None:
        self._credit -= len(frame.data)
        await self._publish(frame)

    # -- worker → client ---------------------------------------------------------------------

    async def _from_worker(self, out: Subscription) -> None:
        async for msg in out.messages:
            self._heard = time.monotonic()
            try:
                frame = decode_frame(msg.data)
            except msgspec.DecodeError:
                message = "malformed session frame from the host"
                self._end(to_worker=SessionFrame("error", message=message), to_client=message)
                return
            if frame.kind == "credit":
                self._credit += frame.credit
                self._credit_granted.set()
            elif frame.kind in ("text", "binary"):
                await self._deliver(frame)
            elif frame.kind == "close":
                self._end(to_worker=None, to_client=None)
                return
            elif frame.kind == "error":
                self._end(to_worker=None, to_client=frame.message or "the session failed")
                return

    async def _deliver(self, frame: SessionFrame) -> None:
        try:
            if frame.kind == "text":
                await self._ws.send_text(frame.data.decode(errors="replace"))
                self._exited = self._kind == "exec"
            else:
                await self._ws.send_bytes(frame.data)
        except (WebSocketDisconnect, OSError, RuntimeError):
            self._end(to_worker=SessionFrame("close"), to_client=None)
            return
        self._owed += len(frame.data)
        if self._owed >= WINDOW_BYTES // 4:
            owed, self._owed = self._owed, 0
            await self._publish(SessionFrame("credit", credit=owed))

    # -- liveness ----------------------------------------------------------------------------

    async def _keep_alive(self) -> None:
        while True:
            await anyio.sleep(PING_INTERVAL_S)
            if time.monotonic() - self._heard > IDLE_TIMEOUT_S:
                message = f"host {self._host} stopped answering"
                self._end(to_worker=SessionFrame("error", message=message), to_client=message)
                return
            await self._publish(SessionFrame("ping"))


async def _receive(ws: WebSocket) -> tuple[bool, bytes] | None:
    """The client's next frame as (is_text, bytes), or None once it disconnected."""
    try:
        message = await ws.receive()
    except (WebSocketDisconnect, RuntimeError):
        return None
    if message["type"] == "websocket.disconnect":
        return None
    if message.get("text") is not None:
        return True, str(message["text"]).encode()
    return False, bytes(message.get("bytes") or b"")


def _is_eof(data: bytes) -> bool:
    if len(data) > 32:
        return False
    try:
        return bool(json.loads(data) == EOF_FRAME)
    except ValueError:
        return False


class _WaitForAgent(msgspec.Struct):
    wait_for_agent: float = 0.0


def _wait_for_agent(kind: SessionKind, text: bool, data: bytes) -> float:
    if kind != "exec" or not text:
        return 0.0
    try:
        wanted = msgspec.json.decode(data, type=_WaitForAgent).wait_for_agent
    except msgspec.DecodeError:
        return 0.0
    return min(max(wanted, 0.0), MAX_WAIT_FOR_AGENT_S)


async def _refuse(ws: WebSocket, kind: SessionKind, message: str) -> None:
    """End an accepted session with an error the way hypeman does: exec answers
    ``Error: <msg>`` and exit code 127; cp a ``{"type":"error"}`` frame."""
    try:
        if kind == "exec":
            await ws.send_bytes(f"Error: {message}\r\n".encode())
            await ws.send_text('{"exitCode":127}')
        else:
            await ws.send_text(json.dumps({"type": "error", "message": message}))
    except (WebSocketDisconnect, OSError, RuntimeError):
        return
    await _close(ws)


async def _close(ws: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
        await ws.close(1000)


async def _unsubscribe_quietly(subscription: Subscription) -> None:
    try:
        await subscription.unsubscribe()
    except Exception as exc:  # the connection is closing: the server drops it anyway
        log.debug("unsubscribe: %r", exc)
