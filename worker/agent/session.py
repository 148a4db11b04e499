"""One multiplexed stream on an agent channel: hypeman's exec/cp/stat frames, flow-controlled."""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import anyio

from worker.agent.errors import AgentSessionClosed, ChannelLost
from worker.agent.protocol import GRANT_AT, MAX_DATA, MAX_TEXT, WINDOW, Kind, cost

if TYPE_CHECKING:
    from worker.agent.channel import AgentChannel

__all__ = ["AgentSession", "Frame", "SessionKind"]

SessionKind = Literal["exec", "cp", "stat"]


@dataclass(frozen=True)
class Frame:
    """One WebSocket-style frame: TEXT (a JSON document) or BINARY (raw bytes)."""

    text: bool
    data: bytes

    @classmethod
    def json(cls, value: object) -> Frame:
        return cls(True, json.dumps(value, separators=(",", ":")).encode())


class AgentSession:
    """Frames to and from one exec, cp or stat in the guest.

    Flow control (docs/agent-protocol.md): :meth:`send` waits until the agent has granted
    credit; :meth:`receive` grants the agent credit as frames are consumed, so at most a
    window of the agent's output is ever buffered here.
    """

    def __init__(self, channel: AgentChannel, sid: int, kind: SessionKind) -> None:
        self.channel = channel
        self.sid = sid
        self.kind = kind
        self._incoming: collections.deque[Frame] = collections.deque()
        self._buffered = 0  # cost of what is in _incoming
        self._ungranted = 0
        self._credit = WINDOW
        self._changed = anyio.Event()
        self._ended = False  # the agent sent END: no more frames
        self._failure: str | None = None
        self._closed = False  # aclose() was called

    def __repr__(self) -> str:
        return f"AgentSession({self.kind} #{self.sid})"

    @property
    def done(self) -> bool:
        return self._ended or self._failure is not None or self._closed

    # -- the user's side ---------------------------------------------------------------------

    async def send(self, frame: Frame) -> None:
        """Send one frame; BINARY data over 64 KiB goes as several frames (a byte stream to
        the agent). Waits for credit; raises AgentSessionClosed once the session is over."""
        if frame.text:
            if len(frame.data) > MAX_TEXT:
                raise AgentSessionClosed(f"a text frame is limited to {MAX_TEXT} bytes")
            await self._send_one(Kind.TEXT, frame.data)
            return
        view = memoryview(frame.data)
        for at in range(0, len(view), MAX_DATA):
            await self._send_one(Kind.BINARY, bytes(view[at : at + MAX_DATA]))

    async def send_eof(self) -> None:
        """The client has no more input (exec: stdin is closed)."""
        self._check_open()
        await self._write(Kind.EOF, b"")

    async def receive(self) -> Frame:
        """The agent's next frame; anyio.EndOfStream after the last one, AgentSessionClosed
        if the session failed (frames that arrived before the failure come first)."""
        while True:
            if self._closed:
                raise AgentSessionClosed("the session was closed")
            if self._incoming:
                frame = self._incoming.popleft()
                await self._consumed(cost(len(frame.data)))
                return frame
            if self._failure is not None:
                raise AgentSessionClosed(self._failure)
            if self._ended:
                raise anyio.EndOfStream
            await self._changed.wait()

    async def aclose(self) -> None:
        """Abort: the agent kills the session's processes and frees it. Idempotent."""
        if self._closed:
            return
        was_live = not self._ended and self._failure is None
        self._closed = True
        self._notify()
        self.channel.forget(self)
        if was_live:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.channel.write(Kind.ABORT, self.sid, quiet=True)

    async def __aenter__(self) -> AgentSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the channel's side ------------------------------------------------------------------

    def deliver(self, kind: int, payload: bytes) -> bool:
        """A frame from the agent; False if it overran its window (the agent's bug)."""
        if self.done:
            return True
        if kind == Kind.CREDIT:
            if len(payload) == 4:
                self._credit += int.from_bytes(payload, "big")
        elif kind == Kind.END:
            self._ended = True
        elif kind == Kind.ABORT:
            self._failure = payload.decode(errors="replace") or "the agent ended the session"
        elif kind in (Kind.TEXT, Kind.BINARY):
            self._buffered += cost(len(payload))
            if self._buffered > WINDOW + cost(MAX_TEXT):
                return False
            self._incoming.append(Frame(kind == Kind.TEXT, payload))
        self._notify()
        return True

    def fail(self, reason: str) -> None:
        if not self.done:
            self._failure = reason
            self._notify()

    # -- inside ------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _check_open(self) -> None:
        if self._closed:
            raise AgentSessionClosed("the session was closed")
        if self._failure is not None:
            raise AgentSessionClosed(self._failure)
        if self._ended:
            raise AgentSessionClosed("the session has ended")

    async def _send_one(self, kind: Kind, payload: bytes) -> None:
        while True:
            self._check_open()
            if self._credit > 0:
                break
            await self._changed.wait()
        self._credit -= cost(len(payload))
        await self._write(kind, payload)

    async def _write(self, kind: Kind, payload: bytes) -> None:
        try:
            await self.channel.write(kind, self.sid, payload)
        except ChannelLost as exc:
            self.fail(str(exc))
            raise AgentSessionClosed(str(exc)) from None

    async def _consumed(self, amount: int) -> None:
        self._buffered -= amount
        self._ungranted += amount
        if self._ungranted >= GRANT_AT and not self.done:
            grant, self._ungranted = self._ungranted, 0
            await self.channel.write(Kind.CREDIT, self.sid, grant.to_bytes(4, "big"), quiet=True)
