"""One live connection to a guest agent: the handshake, the frame reader, heartbeats."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable

import anyio
from anyio.abc import ByteStream

from natsbus.backoff import Backoff
from worker.agent.errors import ChannelLost
from worker.agent.protocol import SYNC, VERSION, FrameParser, Kind, RawFrame, encode
from worker.agent.session import AgentSession, SessionKind

__all__ = ["AgentChannel", "ChannelLost"]

log = logging.getLogger(__name__)

#: Longest a single write may take before the channel counts as stuck.
WRITE_TIMEOUT_S = 30.0


class AgentChannel:
    """Frames over one byte stream to one agent.

    :meth:`serve` runs the reader, says HELLO until the agent answers (it may still be
    booting), then pings it; it returns or raises when the channel is lost. Session ids come
    from ``sids``, shared by every channel of the instance, so a late frame of a session of
    an earlier connection can never be taken for one of this connection's.
    """

    def __init__(
        self,
        stream: ByteStream,
        *,
        sids: itertools.count[int],
        heartbeat_s: float = 2.0,
        dead_after_s: float = 15.0,
    ) -> None:
        self._stream = stream
        self._sids = sids
        self._heartbeat_s = heartbeat_s
        self._dead_after_s = dead_after_s
        self._write_lock = anyio.Lock()
        self._sessions: dict[int, AgentSession] = {}
        self._parser = FrameParser()
        self._nonces = itertools.count(1)
        self._hello_nonce = 0
        self._hello = anyio.Event()
        self._pongs: dict[bytes, anyio.Event] = {}
        self._last_seen = time.monotonic()
        self._lost: str | None = None
        #: What the agent said in its HELLO (its pid, limits).
        self.agent_info: dict[str, object] = {}

    @property
    def lost(self) -> str | None:
        """Why the channel is unusable (None while it is not)."""
        return self._lost

    @property
    def ready(self) -> bool:
        return self._hello.is_set() and self._lost is None

    # -- serving -----------------------------------------------------------------------------

    async def serve(self, on_ready: Callable[[], None]) -> None:
        """Until the channel is lost (raises ChannelLost); sessions then fail with its reason."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_loop, tg.cancel_scope)
                try:
                    await self._say_hello()
                    on_ready()
                    await self._heartbeat()
                except ChannelLost:
                    pass
                tg.cancel_scope.cancel()
        finally:
            self.lose(self._lost or "the agent channel closed")
        raise ChannelLost(self._lost)

    async def _read_loop(self, scope: anyio.CancelScope) -> None:
        try:
            while True:
                data = await self._stream.receive(256 << 10)
                self._last_seen = time.monotonic()
                for frame in self._parser.feed(data):
                    self._dispatch(frame)
                if self._lost is not None:
                    break
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._lost = self._lost or "the agent channel closed (the VM or its VMM went away)"
        except OSError as exc:
            self._lost = self._lost or f"the agent channel failed: {exc}"
        scope.cancel()

    async def _say_hello(self) -> None:
        """HELLO until answered: the agent may not be up yet, and a HELLO sent before it
        opened its end may be lost. Only the answer to the latest HELLO counts."""
        backoff = Backoff(first_s=0.5, max_s=2.0)
        while True:
            self._hello_nonce = next(self._nonces)
            body = json.dumps({"version": VERSION, "nonce": self._hello_nonce}).encode()
            await self._write_raw(SYNC + encode(Kind.HELLO, 0, body))
            with anyio.move_on_after(backoff.advance()):
                await self._hello.wait()
                return

    async def _heartbeat(self) -> None:
        while True:
            await anyio.sleep(self._heartbeat_s)
            if time.monotonic() - self._last_seen > self._dead_after_s:
                self._lost = f"the agent did not answer for {self._dead_after_s:g}s"
                return
            await self.write(Kind.PING, 0, b"hb")

    def _dispatch(self, frame: RawFrame) -> None:
        if frame.sid == 0:
            self._channel_frame(frame)
            return
        session = self._sessions.get(frame.sid)
        if session is None:
            return  # a session already closed here (or of an earlier connection)
        if not session.deliver(frame.kind, frame.payload):
            self.forget(session)
            session.fail("the agent overran the session's flow-control window")
            return
        if frame.kind in (Kind.END, Kind.ABORT):
            self.forget(session)

    def _channel_frame(self, frame: RawFrame) -> None:
        if frame.kind == Kind.HELLO:
            self._on_hello(frame.payload)
        elif frame.kind == Kind.PONG:
            event = self._pongs.pop(frame.payload, None)
            if event is not None:
                event.set()
        elif frame.kind == Kind.GONE:
            self._lost = "the agent exited in the guest"

    def _on_hello(self, payload: bytes) -> None:
        try:
            info = json.loads(payload)
        except ValueError:
            return
        if not isinstance(info, dict) or info.get("nonce") != self._hello_nonce:
            return  # the answer to an earlier HELLO: a later one is on its way
        if info.get("version") != VERSION or "error" in info:
            self._lost = f"the agent speaks protocol {info.get('version')}, not {VERSION}"
            return
        self.agent_info = info
        self._hello.set()

    # -- writing -----------------------------------------------------------------------------

    async def write(
        self, kind: Kind, sid: int, payload: bytes = b"", *, quiet: bool = False
    ) -> None:
        """Write one frame. A lost channel raises ChannelLost (``quiet``: nothing)."""
        if self._lost is not None:
            if quiet:
                return
            raise ChannelLost(self._lost)
        await self._write_raw(encode(kind, sid, payload), quiet=quiet)

    async def _write_raw(self, data: bytes, *, quiet: bool = False) -> None:
        # A frame is never half-written: a cancelled write would desynchronise the stream.
        async with self._write_lock:
            with anyio.CancelScope(shield=True):
                try:
                    with anyio.fail_after(WRITE_TIMEOUT_S):
                        await self._stream.send(data)
                except TimeoutError:
                    self.lose("the agent channel is stuck (a write did not complete)")
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    self.lose("the agent channel closed (the VM or its VMM went away)")
        if self._lost is not None and not quiet:
            raise ChannelLost(self._lost)

    # -- sessions ----------------------------------------------------------------------------

    async def open(self, kind: SessionKind) -> AgentSession:
        session = AgentSession(self, next(self._sids), kind)
        self._sessions[session.sid] = session
        try:
            await self.write(Kind.OPEN, session.sid, kind.encode())
        except ChannelLost:
            self.forget(session)
            raise
        return session

    def forget(self, session: AgentSession) -> None:
        if self._sessions.get(session.sid) is session:
            del self._sessions[session.sid]

    async def ping(self) -> float:
        """One round trip through the agent, in seconds."""
        token = next(self._nonces).to_bytes(8, "big")
        event = self._pongs[token] = anyio.Event()
        started = time.perf_counter()
        try:
            await self.write(Kind.PING, 0, token)
            await event.wait()
        finally:
            self._pongs.pop(token, None)
        return time.perf_counter() - started

    def lose(self, reason: str) -> None:
        """End the channel: every open session fails with ``reason``."""
        if self._lost is None:
            self._lost = reason
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.fail(self._lost)
