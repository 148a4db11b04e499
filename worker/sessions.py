"""Guest sessions of this host: exec and cp relayed between NATS and the guest agent, and
the one-shot stat.

The transport (subjects, frames, credit, liveness) is described in ``schemas.sessions``.
The worker is a relay: it checks the instance is here and Running, writes the audit line,
opens an agent session (waiting up to the exec request's ``wait_for_agent``), hands it the
client's first frame, and from then on moves frames both ways without looking inside them.

Every session is a task of :meth:`SessionServer.run`'s task group, so a worker that stops
ends them all; whatever way a session ends, its agent session is aborted (the agent kills
the process group) and its subscription is gone.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Final, Literal, Protocol

import anyio
import msgspec
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.api import InstanceState
from schemas.errors import BadRequest, ErrorInfo, InvalidState, VmfleetError
from schemas.sessions import (
    CLIENT_CHUNK_BYTES,
    IDLE_TIMEOUT_S,
    MAX_TEXT_BYTES,
    PING_INTERVAL_S,
    WINDOW_BYTES,
    FrameKind,
    PathInfo,
    SessionFrame,
    SessionOpen,
    SessionOpened,
    StatReply,
    decode_frame,
    decode_session_open,
    decode_stat_request,
    encode_session,
)
from schemas.subjects import Subjects
from worker.agent import AgentSession, AgentSessionClosed, AgentUnavailable, Frame
from worker.engine import HostEngine
from worker.metrics import WorkerMetrics

__all__ = ["EngineSessionHost", "SessionHost", "SessionServer", "serve_sessions"]

log = logging.getLogger(__name__)

#: The longest ``wait_for_agent`` honoured: a session open is a request the gateway awaits.
MAX_WAIT_FOR_AGENT_S: Final = 300.0
#: A guest agent that takes longer to answer a stat is treated as gone.
STAT_TIMEOUT_S: Final = 30.0


class AgentOpener(Protocol):
    """What the relay needs of ``worker.agent.AgentHub``."""

    async def open_session(
        self, instance_id: str, kind: Literal["exec", "cp", "stat"], *, wait_s: float = 0.0
    ) -> AgentSession: ...


class SessionHost(Protocol):
    """What the relay needs of the host's instances."""

    def state(self, instance_id: str) -> InstanceState:
        """The instance's state here; NotFound when it is not on this host."""

    def audit(self, instance_id: str, message: str, **fields: object) -> None:
        """A line in the instance's ops log."""


class EngineSessionHost:
    """:class:`SessionHost` over the worker's engine."""

    def __init__(self, engine: HostEngine) -> None:
        self._engine = engine

    def state(self, instance_id: str) -> InstanceState:
        return self._engine.get(instance_id).state

    def audit(self, instance_id: str, message: str, **fields: object) -> None:
        extras = " ".join(f"{key}={value}" for key, value in fields.items())
        self._engine.ctx.oplog(self._engine.instance(instance_id), f"{message} {extras}")


async def serve_sessions(
    nc: Client,
    subjects: Subjects,
    host_id: str,
    engine: HostEngine,
    metrics: WorkerMetrics,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The daemon's entry: sessions of this host's instances, through the engine's hub."""
    if engine.ctx.agent is None:
        raise RuntimeError("the worker's engine has no agent hub")
    server = SessionServer(
        nc,
        subjects,
        host_id,
        EngineSessionHost(engine),
        engine.ctx.agent,
        metrics,
        on_session=engine.ctx.inbound.session_changed,
    )
    await server.run(task_status=task_status)


class SessionServer:
    """Serves ``<p>.host.<host>.session`` and ``<p>.host.<host>.stat`` for this host."""

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        host_id: str,
        host: SessionHost,
        agents: AgentOpener,
        metrics: WorkerMetrics,
        *,
        on_session: Callable[[str, int], None] = lambda instance_id, delta: None,
    ) -> None:
        self._nc = nc
        #: Told of each session opened (+1) and ended (-1): an idle standby waits for them.
        self._on_session = on_session
        self._subjects = subjects
        self._host_id = host_id
        self._host = host
        self._agents = agents
        self._metrics = metrics

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        opens = await self._nc.subscribe(self._subjects.session_open(self._host_id))
        stats = await self._nc.subscribe(self._subjects.stat_query(self._host_id))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._take, opens, tg, self._serve_session)
                tg.start_soon(self._take, stats, tg, self._serve_stat)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                for subscription in (opens, stats):
                    await _unsubscribe_quietly(subscription)

    async def _take(
        self, subscription: Subscription, tg: anyio.abc.TaskGroup, handler: _Handler
    ) -> None:
        async for msg in subscription.messages:
            tg.start_soon(self._guarded, handler, msg)

    async def _guarded(self, handler: _Handler, msg: Msg) -> None:
        """One session's failure is that session's: never the worker's."""
        try:
            await handler(msg)
        except Exception:
            log.exception("a guest session on %s failed", msg.subject)

    # -- exec and cp -------------------------------------------------------------------------

    async def _serve_session(self, msg: Msg) -> None:
        try:
            request = decode_session_open(msg.data)
            self._subjects.session_in(self._host_id, request.session_id)  # a valid token
        except (msgspec.DecodeError, ValueError) as exc:
            await _answer(msg, SessionOpened(ok=False, error=BadRequest(str(exc)).info()))
            return
        try:
            agent = await self._open_agent(request)
        except VmfleetError as exc:
            await _answer(msg, SessionOpened(ok=False, error=exc.info()))
            return
        started = time.monotonic()
        gauge = self._metrics.guest_sessions.labels(kind=request.kind)
        gauge.inc()
        self._on_session(request.instance_id, 1)
        subscription: Subscription | None = None
        try:
            subscription = await self._nc.subscribe(
                self._subjects.session_in(self._host_id, request.session_id)
            )
            try:
                await agent.send(Frame(text=request.first_text, data=request.first))
            except AgentSessionClosed as exc:
                await _answer(msg, SessionOpened(ok=False, error=_agent_gone(exc)))
                return
            await _answer(msg, SessionOpened(ok=True, window=WINDOW_BYTES))
            await _Relay(self, request, agent).run(subscription)
        finally:
            with anyio.CancelScope(shield=True):
                await agent.aclose()
                if subscription is not None:
                    await _unsubscribe_quietly(subscription)
                gauge.dec()
                self._on_session(request.instance_id, -1)
                if request.kind == "exec":
                    self._metrics.exec_duration.observe(time.monotonic() - started)

    async def _open_agent(self, request: SessionOpen) -> AgentSession:
        """Check, audit, and open the agent's side, waiting as long as the client asked."""
        self.require_running(request.instance_id)
        details = _request_details(request)
        self._host.audit(
            request.instance_id,
            request.kind,
            subject=json.dumps(request.subject),
            session=request.session_id,
            **details.audit,
        )
        return await self._agents.open_session(
            request.instance_id, request.kind, wait_s=details.wait_s
        )

    def require_running(self, instance_id: str) -> None:
        state = self._host.state(instance_id)
        if state is not InstanceState.RUNNING:
            raise InvalidState(f"instance must be running (current state: {state.value})")

    def out_subject(self, session_id: str) -> str:
        return self._subjects.session_out(self._host_id, session_id)

    def count_to_guest(self, size: int) -> None:
        self._metrics.guest_session_bytes.labels(direction="to_guest").inc(size)

    async def publish(self, subject: str, frame: SessionFrame) -> None:
        if frame.kind in ("text", "binary"):
            self._metrics.guest_session_bytes.labels(direction="from_guest").inc(len(frame.data))
        await self._nc.publish(subject, encode_session(frame))

    # -- stat --------------------------------------------------------------------------------

    async def _serve_stat(self, msg: Msg) -> None:
        try:
            request = decode_stat_request(msg.data)
            self.require_running(request.instance_id)
            info = await self._stat(request.instance_id, request.path, request.follow_links)
        except msgspec.DecodeError as exc:
            await _answer(msg, StatReply(ok=False, error=BadRequest(str(exc)).info()))
        except VmfleetError as exc:
            await _answer(msg, StatReply(ok=False, error=exc.info()))
        else:
            await _answer(msg, StatReply(ok=True, info=info))

    async def _stat(self, instance_id: str, path: str, follow_links: bool) -> PathInfo:
        try:
            agent = await self._agents.open_session(instance_id, "stat")
        except AgentUnavailable as exc:
            log.info("stat on %s: %s", instance_id, exc)
            raise VmfleetError("failed to connect to guest agent") from None
        try:
            query = json.dumps({"path": path, "follow_links": follow_links}).encode()
            with anyio.fail_after(STAT_TIMEOUT_S):
                await agent.send(Frame(text=True, data=query))
                answer = await agent.receive()
            return msgspec.json.decode(answer.data, type=PathInfo)
        except (AgentSessionClosed, anyio.EndOfStream, TimeoutError, msgspec.DecodeError) as exc:
            log.info("stat on %s failed: %r", instance_id, exc)
            raise VmfleetError("failed to stat path in guest") from None
        finally:
            with anyio.CancelScope(shield=True):
                await agent.aclose()


class _Handler(Protocol):
    async def __call__(self, msg: Msg, /) -> None: ...


class _Relay:
    """One open session: NATS ``in`` → agent, agent → NATS ``out``, pings, and its end."""

    def __init__(self, server: SessionServer, request: SessionOpen, agent: AgentSession) -> None:
        self._server = server
        self._request = request
        self._agent = agent
        self._out = server.out_subject(request.session_id)
        self._credit = request.window  # what the gateway lets us send
        self._credit_granted = anyio.Event()
        self._owed = 0  # bytes forwarded to the agent, not yet granted back to the gateway
        self._queued = 0  # bytes received from the gateway, not yet forwarded
        self._heard = time.monotonic()
        self._final: SessionFrame | None = None
        self._ended = False
        self._scope = anyio.CancelScope()

    async def run(self, subscription: Subscription) -> None:
        to_agent, queue = anyio.create_memory_object_stream[SessionFrame](math.inf)
        with self._scope:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._read_gateway, subscription, to_agent)
                    tg.start_soon(self._to_agent, queue)
                    tg.start_soon(self._from_agent)
                    tg.start_soon(self._keep_alive)
            finally:
                if not self._ended:  # cancelled from outside: the worker is stopping
                    self._final = SessionFrame("error", message="the worker is stopping")
                with anyio.CancelScope(shield=True):
                    to_agent.close()
                    queue.close()
                    if self._final is not None:
                        await self._server.publish(self._out, self._final)

    def _end(self, final: SessionFrame | None) -> None:
        """End the session once; ``final`` is what the gateway is told (None: nothing, it
        ended the session itself)."""
        if not self._ended:
            self._ended = True
            self._final = final
            self._scope.cancel()

    def _fail(self, message: str) -> None:
        self._end(SessionFrame("error", message=message))

    # -- gateway → agent ---------------------------------------------------------------------

    async def _read_gateway(
        self, subscription: Subscription, to_agent: MemoryObjectSendStream[SessionFrame]
    ) -> None:
        """Control frames act at once (so credit is never stuck behind stdin the agent has
        no room for); data frames queue for :meth:`_to_agent`, bounded by our credit."""
        async for msg in subscription.messages:
            self._heard = time.monotonic()
            try:
                frame = decode_frame(msg.data)
            except msgspec.DecodeError:
                self._fail("malformed session frame from the gateway")
                return
            if frame.kind in ("text", "binary", "eof"):
                self._queued += len(frame.data)
                if self._queued > WINDOW_BYTES + MAX_TEXT_BYTES:
                    self._fail("the gateway sent more than its credit")
                    return
                to_agent.send_nowait(frame)
            elif frame.kind == "credit":
                self._credit += frame.credit
                self._credit_granted.set()
            elif frame.kind in ("close", "error"):
                self._end(None)
                return

    async def _to_agent(self, queue: MemoryObjectReceiveStream[SessionFrame]) -> None:
        async for frame in queue:
            try:
                if frame.kind == "eof":
                    await self._agent.send_eof()
                else:
                    await self._agent.send(Frame(text=frame.kind == "text", data=frame.data))
            except AgentSessionClosed as exc:
                self._end(SessionFrame("error", message=_agent_gone(exc).message))
                return
            size = len(frame.data)
            self._server.count_to_guest(size)
            self._queued -= size
            await self._grant(size)

    async def _grant(self, size: int) -> None:
        """Give credit back in batches of a quarter window (see schemas.sessions §3)."""
        self._owed += size
        if self._owed >= WINDOW_BYTES // 4:
            owed, self._owed = self._owed, 0
            await self._server.publish(self._out, SessionFrame("credit", credit=owed))

    # -- agent → gateway ---------------------------------------------------------------------

    async def _from_agent(self) -> None:
        while True:
            try:
                frame = await self._agent.receive()
            except anyio.EndOfStream:
                self._end(SessionFrame("close"))
                return
            except AgentSessionClosed as exc:
                self._end(SessionFrame("error", message=_agent_gone(exc).message))
                return
            if frame.text:
                if len(frame.data) > MAX_TEXT_BYTES:
                    self._fail("the guest agent sent a text frame larger than 512 KiB")
                    return
                await self._send("text", frame.data)
            else:
                for start in range(0, len(frame.data), CLIENT_CHUNK_BYTES):
                    await self._send("binary", frame.data[start : start + CLIENT_CHUNK_BYTES])

    async def _send(self, kind: FrameKind, data: bytes) -> None:
        while self._credit <= 0:
            self._credit_granted = anyio.Event()
            await self._credit_granted.wait()
        self._credit -= len(data)
        await self._server.publish(self._out, SessionFrame(kind, data))

    # -- liveness ----------------------------------------------------------------------------

    async def _keep_alive(self) -> None:
        while True:
            await anyio.sleep(PING_INTERVAL_S)
            if time.monotonic() - self._heard > IDLE_TIMEOUT_S:
                log.info("session %s: the gateway went silent", self._request.session_id)
                self._fail("the gateway stopped answering")
                return
            try:
                self._server.require_running(self._request.instance_id)
            except VmfleetError as exc:
                self._fail(exc.message)
                return
            await self._server.publish(self._out, SessionFrame("ping"))


def _agent_gone(exc: Exception) -> ErrorInfo:
    message = str(exc) or "the guest agent closed the session"
    return ErrorInfo(status=500, code="agent_unavailable", message=message)


class _Details(msgspec.Struct, frozen=True):
    wait_s: float
    audit: dict[str, object]


class _ExecRequest(msgspec.Struct, frozen=True):
    """The fields of an exec request the host side reads (the agent reads the rest)."""

    command: list[str] = []
    tty: bool = False
    wait_for_agent: float = 0.0


class _CopyRequest(msgspec.Struct, frozen=True):
    direction: str = ""
    guest_path: str = ""


def _request_details(request: SessionOpen) -> _Details:
    """How long to wait for the agent, and what the audit line says. A first frame that is
    not a valid request is still handed to the agent, which answers it with an error."""
    if not request.first_text:
        return _Details(0.0, {"request": "binary"})
    try:
        if request.kind == "exec":
            exec_request = msgspec.json.decode(request.first, type=_ExecRequest)
            wait_s = min(max(exec_request.wait_for_agent, 0.0), MAX_WAIT_FOR_AGENT_S)
            argv = json.dumps(exec_request.command, separators=(",", ":"))
            return _Details(wait_s, {"argv": argv, "tty": exec_request.tty})
        copy = msgspec.json.decode(request.first, type=_CopyRequest)
        return _Details(0.0, {"direction": copy.direction, "path": json.dumps(copy.guest_path)})
    except msgspec.DecodeError:
        return _Details(0.0, {"request": "malformed"})


async def _answer(msg: Msg, reply: SessionOpened | StatReply) -> None:
    if msg.reply:
        await msg.respond(encode_session(reply))


async def _unsubscribe_quietly(subscription: Subscription) -> None:
    try:
        await subscription.unsubscribe()
    except Exception as exc:  # the connection is closing: the server drops it anyway
        log.debug("unsubscribe: %r", exc)
