"""One sleeping instance's mapped ports, held by the worker until the instance runs again.

A :class:`Sleeper` owns the listening sockets of one instance in Standby. The first
connection asks its :class:`Backend` for a restore (one, however many connections come);
every connection is held (accepted, never refused) in a bounded queue, and once the guest
listens each is relayed to it, in the order they arrived. Then the sleeper hands the ports
to the kernel path (the backend's :meth:`Backend.hand_off`): it accepts what the kernel
has queued, closes its listeners and lets the backend forward the ports; the held
connections stay relayed until they end.

Faults: a restore that fails closes the held connections and the next connection tries
again after a backoff that doubles; a connection held longer than ``hold_timeout_s`` is
closed; while ``max_held`` connections wait, further ones wait in the kernel's backlog for
``full_wait_s``, then are accepted and closed. Each of these says so in one log line.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from anyio.abc import ByteStream, SocketStream, TaskGroup

from worker.wake.catch import original_destination

__all__ = ["Backend", "GuestNotListening", "HeldConnection", "Listener", "Sleeper", "WakeSettings"]

log = logging.getLogger(__name__)


class GuestNotListening(Exception):
    """The guest refused a connection to its port: not listening (yet)."""


@dataclass(frozen=True)
class WakeSettings:
    #: Connections held at once while the instance wakes.
    max_held: int = 256
    #: How long a held connection waits for the guest before it is closed.
    hold_timeout_s: float = 30.0
    #: How long connections beyond ``max_held`` wait in the kernel's backlog.
    full_wait_s: float = 2.0
    #: The wait before a restore is tried again after one failed; doubles up to the max.
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    #: How long a woken guest gets to listen on a port before the port is handed over anyway.
    listen_timeout_s: float = 30.0
    #: The pause between two tries of a port the guest does not listen on yet.
    retry_interval_s: float = 0.01


@dataclass
class Listener:
    """A mapped host port, bound by the worker; or (``catch_ip`` set, bridge mode) the
    worker's port that connections to the guest's address are redirected to, each relayed
    to the port it was meant for (worker.wake.catch)."""

    host_port: int
    guest_port: int
    sock: socket.socket
    catch_ip: str | None = None


@dataclass
class HeldConnection:
    client: SocketStream
    listener: Listener
    peer: tuple[str, int]
    #: The guest port it goes to (the listener's, or the one a caught connection meant).
    guest_port: int = 0
    accepted_at: float = field(default_factory=time.monotonic)


class Backend(Protocol):
    """What a sleeper needs from the worker."""

    async def restore(self) -> None:
        """Restore the instance (through the engine); raise on failure."""
        ...

    async def connect(self, guest_port: int) -> ByteStream:
        """A connection to the guest's port; GuestNotListening when the guest refused it."""
        ...

    async def hand_off(self, listeners: list[Listener]) -> None:
        """The ports (their sockets closed just now) go to the kernel path."""
        ...

    def opened(self, conn: HeldConnection) -> None: ...

    def closed(self, conn: HeldConnection) -> None: ...

    def answered(self) -> None:
        """The guest answered the first relayed connection (or there was none to relay)."""
        ...

    def woke(self, cause: str, seconds: float, running_s: float) -> None:
        """A wake is done (the first connection reached the guest, or a restore through the
        API left the guest listening) ``seconds`` after it began, the VM running after
        ``running_s``: count and time it."""
        ...


class Sleeper:
    def __init__(
        self,
        instance_id: str,
        listeners: list[Listener],
        backend: Backend,
        settings: WakeSettings,
        *,
        on_done: Callable[[Sleeper], None] = lambda sleeper: None,
    ) -> None:
        self.instance_id = instance_id
        self.listeners = listeners
        self._backend = backend
        self._settings = settings
        self._on_done = on_done
        self._queue: deque[HeldConnection] = deque()
        self._arrived = anyio.Event()
        self._room = anyio.Event()
        #: Set when a restore is under way (ours or the API's), so no second one is asked for.
        self._restoring = False
        self._restore_cause = "connection"
        self._restore_started = 0.0
        self._running = anyio.Event()
        self._running_at = 0.0
        self._failed: str | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._closed = False
        self._accepting = anyio.CancelScope()
        self._accept_stopped = anyio.Event()
        self._handed_off = False
        self._handing_off = False
        #: Guest ports a connection went through: the guest listens there.
        self._listening: set[int] = set()
        self._woke_reported = False
        self._tg: TaskGroup | None = None
        #: Connections relayed so far (tests, logs).
        self.relayed = 0

    # -- what the manager tells it ----------------------------------------------------------

    def restore_started(self, cause: str) -> None:
        """A restore began (ours, or one through the API): hold on, do not ask for another."""
        if not self._restoring:
            self._restoring, self._restore_cause = True, cause
            self._restore_started = time.monotonic()
            self._arrived.set()

    def vm_running(self) -> None:
        self._running_at = time.monotonic()
        self._running.set()

    def restore_failed(self, error: str) -> None:
        self._failed = error
        self._running.set()  # wakes the waiter, which sees the failure

    def close(self) -> None:
        """Give up the ports without a hand-off (the instance was deleted or went to
        Standby for another cause); connections relayed after a hand-off go on."""
        if self._handed_off:
            return
        self._closed = True
        if self._tg is None:
            self._close_listeners()
        else:
            self._tg.cancel_scope.cancel()

    @property
    def held(self) -> int:
        return len(self._queue)

    # -- the work -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the ports are handed off and the relayed connections end (or
        :meth:`close`)."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._accept_all)
                await self._wake_and_hand_off(tg)
        finally:
            with anyio.CancelScope(shield=True):
                self._close_listeners()
                while self._queue:
                    await self._drop(self._queue.popleft(), "the worker let go of the port")
            self._on_done(self)

    async def _accept_all(self) -> None:
        try:
            with self._accepting:
                async with anyio.create_task_group() as tg:
                    for listener in self.listeners:
                        tg.start_soon(self._accept_loop, listener)
        finally:
            self._accept_stopped.set()

    async def _accept_loop(self, listener: Listener) -> None:
        while True:
            await anyio.wait_readable(listener.sock)
            if self._full() and not await self._room_within_wait():
                await self._accept_ready(listener, at_most=1)  # accepted and closed
                continue
            await self._accept_ready(listener)

    async def _accept_ready(self, listener: Listener, *, at_most: int | None = None) -> None:
        """Accept what the kernel has queued on ``listener``: up to ``at_most``, or until
        the queue is full (None: all of it, the hand-off's last look)."""
        accepted = 0
        while at_most is None or accepted < at_most:
            if at_most is not None and accepted and self._full():
                return
            try:
                sock, peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # the socket was closed under us
                log.debug("%s: accept on port %d: %s", self.instance_id, listener.host_port, exc)
                return
            accepted += 1
            await self._hold(sock, peer, listener)
            if at_most is None and self._full() and not self._handing_off:
                return

    async def _hold(self, sock: socket.socket, peer: tuple[str, int], listener: Listener) -> None:
        guest_port = _guest_port(sock, listener)
        if guest_port is None:
            log.warning(
                "%s: a connection from %s:%d to the wake port %d was not redirected from "
                "the guest's address: closed",
                self.instance_id,
                peer[0],
                peer[1],
                listener.host_port,
            )
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = await SocketStream.from_socket(sock)
        conn = HeldConnection(stream, listener, (peer[0], peer[1]), guest_port)
        self._backend.opened(conn)
        if len(self._queue) >= self._settings.max_held:
            await self._drop(
                conn,
                f"{self._settings.max_held} connections wait already (the limit) and none "
                f"left the queue within {self._settings.full_wait_s:g}s",
                level=logging.WARNING,
            )
            return
        self._queue.append(conn)
        self._arrived.set()

    def _full(self) -> bool:
        return len(self._queue) >= self._settings.max_held

    async def _room_within_wait(self) -> bool:
        """While the queue is full, new connections wait in the kernel's backlog for a
        while; False if no room came (the next one is then accepted and closed)."""
        if self._room.is_set():
            self._room = anyio.Event()
        with anyio.move_on_after(self._settings.full_wait_s):
            await self._room.wait()
        return not self._full()

    async def _wake_and_hand_off(self, tg: TaskGroup) -> None:
        while True:
            await self._wait_for_work()
            if await self._woken(tg):
                break
        await self._relay_and_hand_off(tg)

    async def _wait_for_work(self) -> None:
        """Until a connection waits (or a restore through the API began); held
        connections past their time are closed meanwhile."""
        while not self._restoring:
            if self._queue:
                delay = self._retry_at - time.monotonic()
                if delay <= 0:
                    return
                await self._expire_within(delay)
                continue
            self._arrived = anyio.Event()
            await self._arrived.wait()

    async def _woken(self, tg: TaskGroup) -> bool:
        """Restore (unless one is under way) and wait for the guest to run; False, the held
        connections closed and a backoff set, when it failed."""
        if not self._restoring:
            self.restore_started("connection")
            tg.start_soon(self._restore)
        while not self._running.is_set():
            await self._expire_within(self._settings.hold_timeout_s, until=self._running)
        if self._failed is None:
            return True
        await self._after_failure(self._failed)
        return False

    async def _restore(self) -> None:
        try:
            await self._backend.restore()
        except Exception as exc:
            self.restore_failed(str(exc) or type(exc).__name__)

    async def _after_failure(self, error: str) -> None:
        self._failures += 1
        backoff = min(
            self._settings.backoff_s * 2 ** (self._failures - 1), self._settings.backoff_max_s
        )
        self._retry_at = time.monotonic() + backoff
        count = len(self._queue)
        log.error(
            "%s: the wake failed (%s): closing %d held connection(s); the next connection "
            "tries again in %.1fs",
            self.instance_id,
            error,
            count,
            backoff,
        )
        while self._queue:
            await self._drop(self._queue.popleft(), "the wake failed")
        self._backend.answered()
        self._restoring, self._failed, self._running = False, None, anyio.Event()

    async def _expire_within(self, seconds: float, until: anyio.Event | None = None) -> None:
        """Wait ``seconds`` at most (less if a held connection's time runs out first, or
        ``until`` is set), then close the connections held too long."""
        if self._queue:
            oldest = self._queue[0].accepted_at + self._settings.hold_timeout_s
            seconds = min(seconds, max(0.0, oldest - time.monotonic()))
        with anyio.move_on_after(seconds):
            if until is not None:
                await until.wait()
            else:
                await anyio.sleep(seconds)
        now = time.monotonic()
        while self._queue and now - self._queue[0].accepted_at >= self._settings.hold_timeout_s:
            await self._drop(
                self._queue.popleft(),
                f"the instance did not wake within {self._settings.hold_timeout_s:g}s",
                level=logging.WARNING,
            )
            self._room.set()

    async def _relay_and_hand_off(self, tg: TaskGroup) -> None:
        """The guest runs: relay the held connections in order, wait until it listens on
        every port, then give the ports to the kernel path."""
        await self._relay_queued(tg)
        await self._wait_until_listening()
        self._accepting.cancel()
        await self._accept_stopped.wait()
        self._handing_off = True
        for listener in self.listeners:  # what the kernel queued since: relayed too
            await self._accept_ready(listener)
        closed_at = time.monotonic()
        self._close_listeners()
        self._handed_off = True
        if not self.relayed:
            self._backend.answered()
        await self._backend.hand_off(self.listeners)
        gap = time.monotonic() - closed_at  # the one moment a connection may be refused
        await self._relay_queued(tg)
        log.info(
            "%s: awake; %d connection(s) relayed, the ports are on the kernel path again "
            "(a gap of %.1f ms)",
            self.instance_id,
            self.relayed,
            gap * 1000,
        )

    async def _relay_queued(self, tg: TaskGroup) -> None:
        while self._queue:
            conn = self._queue.popleft()
            self._room.set()
            upstream = await self._connect(conn.guest_port)
            if upstream is None:
                await self._drop(conn, "the guest did not listen on its port in time")
                continue
            self._listening.add(conn.guest_port)
            self._report_woke(self._started_at(conn))
            self.relayed += 1
            tg.start_soon(self._pipe, conn, upstream)

    def _report_woke(self, since: float) -> None:
        if not self._woke_reported:
            self._woke_reported = True
            now = time.monotonic()
            self._backend.woke(self._restore_cause, now - since, self._running_at - since)

    def _started_at(self, conn: HeldConnection) -> float:
        """A wake by connection counts from that connection; one through the API from the
        restore's start."""
        if self._restore_cause == "connection":
            return conn.accepted_at
        return self._restore_started

    async def _connect(self, guest_port: int) -> ByteStream | None:
        """Connect to the guest's port, trying again while it refuses (a guest that was not
        listening yet) for up to ``listen_timeout_s``; None if it never accepted."""
        with anyio.move_on_after(self._settings.listen_timeout_s):
            while True:
                try:
                    return await self._backend.connect(guest_port)
                except (GuestNotListening, OSError) as exc:
                    log.debug("%s: port %d not ready: %s", self.instance_id, guest_port, exc)
                await anyio.sleep(self._settings.retry_interval_s)
        return None

    async def _wait_until_listening(self) -> None:
        """Each port the guest serves must take connections before the kernel path gets it
        (a port with no server at all is handed over after ``listen_timeout_s``)."""
        for listener in self.listeners:
            if listener.catch_ip is not None or listener.guest_port in self._listening:
                continue  # a guest's address has no one port to wait for
            probe = await self._connect(listener.guest_port)
            if probe is None:
                log.warning(
                    "%s: the guest does not listen on port %d; handing it over anyway",
                    self.instance_id,
                    listener.guest_port,
                )
                continue
            await probe.aclose()
            self._listening.add(listener.guest_port)
            self._report_woke(self._restore_started)

    async def _pipe(self, conn: HeldConnection, upstream: ByteStream) -> None:
        try:
            async with conn.client, upstream, anyio.create_task_group() as tg:
                tg.start_soon(_copy, conn.client, upstream, tg)
                tg.start_soon(_copy, upstream, conn.client, tg, self._backend.answered)
        finally:
            self._backend.answered()  # an answer or not, it is over
            self._backend.closed(conn)

    async def _drop(self, conn: HeldConnection, why: str, *, level: int = logging.INFO) -> None:
        catch_ip = conn.listener.catch_ip
        to = (
            f"port {conn.listener.host_port}"
            if catch_ip is None
            else f"{catch_ip}:{conn.guest_port}"
        )
        log.log(
            level,
            "%s: closing the connection from %s:%d to %s: %s",
            self.instance_id,
            conn.peer[0],
            conn.peer[1],
            to,
            why,
        )
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await conn.client.aclose()
        self._backend.closed(conn)

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            listener.sock.close()


def _guest_port(sock: socket.socket, listener: Listener) -> int | None:
    """The guest port an accepted connection goes to; None for one on a catch port that
    no redirect to the guest's address brought."""
    if listener.catch_ip is None:
        return listener.guest_port
    meant = original_destination(sock)
    if meant is None or meant[0] != listener.catch_ip:
        return None
    return meant[1]


async def _copy(
    source: ByteStream,
    sink: ByteStream,
    tg: TaskGroup,
    first: Callable[[], None] = lambda: None,
) -> None:
    """One direction (``first`` is told of its first bytes); its end half-closes the other
    side (HTTP/1.0 clients send, then wait for the answer until the server closes)."""
    try:
        async for chunk in source:
            first()
            await sink.send(chunk)
        with contextlib.suppress(Exception):
            await sink.send_eof()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        tg.cancel_scope.cancel()
