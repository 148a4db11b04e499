"""One health check's probe: where it goes, and the two ways it is run.

Where (:func:`probe_target`): a bridge-mode host reaches the guest at its own address
(``record.ip``) on the checked guest port; in user mode (QEMU's own network stack) the host
has no route to the guest, so http/tcp go through the host port mapped to the checked guest
port, on the address the mappings listen on.

How. A plain http or tcp check to an address (always an IP literal: a guest's address or
the mappings' listen address) is a :class:`NetProbe`: a non-blocking socket in an epoll
set that all the loop's probes share (:class:`ProbeIO`), its timeout a place in a shared
bucket. No task, no cancel scope, no name resolution, no happy-eyeballs race, no timer or
reader registration of its own: the supervision loop runs a thousand of these a second on a
few percent of one core, about what the same checks cost as bare blocking socket calls
(``bench/supervision.py``). Anything else (``exec``
through the guest agent, ``https``, a host name) is :func:`probe`, an ordinary coroutine
run in a task of its own: rarer, and each costs what its protocol costs anyway.

Semantics are hypeman's and the same either way: ``tcp`` wants the connection accepted,
``http`` GETs the path and wants exactly ``expected_status`` in the status line, ``exec``
wants exit 0; each within ``timeout``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import math
import os
import select
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import anyio
from anyio.abc import ByteStream

from schemas.messages import HealthCheckSpec, InstanceRecord
from worker.agent import Frame
from worker.engine import HostEngine

__all__ = [
    "MAX_ERROR_CHARS",
    "NetProbe",
    "ProbeIO",
    "ProbeResult",
    "http_request",
    "ip_literal",
    "probe",
    "probe_target",
]

#: hypeman's ``last_error`` is at most 512 characters.
MAX_ERROR_CHARS: Final = 512
#: A status line longer than this is no HTTP answer.
MAX_HTTP_HEAD: Final = 8192


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    error: str | None = None


#: The two results that need no text of their own, shared rather than made per check.
PASSED: Final = ProbeResult(True)


def probe_target(
    record: InstanceRecord, guest_port: int, *, bridge: bool, publish_addr: str
) -> tuple[str, int]:
    """Where the guest's ``guest_port`` is reachable from this host (OSError: nowhere)."""
    if bridge:
        if not record.ip:
            raise OSError("the instance has no address")
        return record.ip, guest_port
    for mapping in record.port_mappings:
        if mapping.guest_port == guest_port and mapping.protocol == "tcp":
            return _local(publish_addr), mapping.host_port
    raise OSError(f"guest port {guest_port} has no host port mapping (user network mode)")


def _local(listen: str) -> str:
    """A listen address as a destination: the wildcard ones mean this host's loopback."""
    if listen in ("", "0.0.0.0"):
        return "127.0.0.1"
    if listen == "::":
        return "::1"
    return listen


def ip_literal(host: str) -> socket.AddressFamily | None:
    """The address family of ``host`` if it is an IP address (None: a name)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def http_request(check: HealthCheckSpec, host: str, port: int) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (
        f"GET {check.path} HTTP/1.1\r\nHost: {authority}\r\n"
        "User-Agent: vmfleet-health\r\nConnection: close\r\n\r\n"
    ).encode()


def judge_http_head(head: bytes, check: HealthCheckSpec) -> ProbeResult:
    if head[8:13] == b" %d " % check.expected_status and head.startswith(b"HTTP/1."):
        return PASSED  # the common answer, told without parsing
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return ProbeResult(False, f"not an HTTP answer: {status_line[:100]!r}")
    status = int(parts[1])
    if status != check.expected_status:
        return ProbeResult(
            False, f"GET {check.path}: status {status}, expected {check.expected_status}"
        )
    return PASSED


class ProbeIO:
    """What every plain probe of one health loop shares, so that a check costs a few
    system calls and no asyncio bookkeeping of its own.

    Readiness: one ``epoll`` set holds the probes' sockets, and the event loop watches only
    that set's descriptor; when it turns readable, :meth:`_ready` takes every ready socket
    in one batch. A socket leaves the set by being closed (the kernel drops it).

    Timeouts: a probe joins the bucket of its deadline (rounded up to :attr:`GRAIN_S`), and
    one loop timer per bucket times out whoever is still in it: a timeout is up to
    :attr:`GRAIN_S` late and costs a set insertion instead of a timer of its own.
    """

    GRAIN_S: Final = 0.05
    #: Ready sockets taken per batch (the rest wait for the next turn of the loop).
    BATCH: Final = 256

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._buckets: dict[int, set[NetProbe]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        loop.add_reader(self._epoll.fileno(), self._ready)

    # -- readiness -------------------------------------------------------------------------

    def watch(self, fd: int, writable: bool, callback: Callable[[], None]) -> None:
        """Call ``callback`` once ``fd`` is readable (or writable), until :meth:`forget`."""
        events = select.EPOLLOUT if writable else select.EPOLLIN
        if fd in self._handlers:
            self._epoll.modify(fd, events)
        else:
            self._epoll.register(fd, events)
        self._handlers[fd] = callback

    def forget(self, fd: int) -> None:
        """``fd`` is about to be closed (which takes it out of the set)."""
        self._handlers.pop(fd, None)

    def _ready(self) -> None:
        for fd, _ in self._epoll.poll(0, self.BATCH):
            callback = self._handlers.get(fd)
            if callback is not None:
                callback()

    # -- timeouts --------------------------------------------------------------------------

    def add_deadline(self, probe: NetProbe, timeout_s: float) -> int:
        key = math.ceil((self.loop.time() + timeout_s) / self.GRAIN_S)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
            self._timers[key] = self.loop.call_at(key * self.GRAIN_S, self._expire, key)
        bucket.add(probe)
        return key

    def remove_deadline(self, probe: NetProbe, key: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.discard(probe)

    def _expire(self, key: int) -> None:
        self._timers.pop(key, None)
        for probe in self._buckets.pop(key, ()):
            probe.timed_out()

    def close(self) -> None:
        """Drop every probe still open, unanswered (their owner is going away), the timers
        and the set: nothing is left registered with the loop."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        buckets, self._buckets = self._buckets, {}
        for bucket in buckets.values():
            for probe in bucket:
                probe.abandon()
        self.loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._handlers.clear()


class NetProbe:
    """One plain http or tcp check, driven by readiness callbacks from the shared
    :class:`ProbeIO`: connect, (http) send the request and read up to the
    status line, close. Exactly one call of ``done`` follows :meth:`start`, from the loop,
    with the result (none if :meth:`abandon` comes first)."""

    __slots__ = (
        "_check",
        "_deadline",
        "_done",
        "_family",
        "_fd",
        "_finished",
        "_head",
        "_io",
        "_pending",
        "_sock",
        "_target",
    )

    def __init__(
        self,
        check: HealthCheckSpec,
        target: tuple[str, int],
        family: socket.AddressFamily,
        request: bytes | None,
        done: Callable[[ProbeResult], None],
        io: ProbeIO,
    ) -> None:
        self._check = check
        self._target = target
        self._family = family
        #: What is left to send (None: a tcp check sends nothing).
        self._pending = request
        self._done = done
        self._io = io
        self._sock: socket.socket | None = None
        self._fd = -1
        self._head = b""
        self._deadline = -1
        self._finished = False

    def start(self) -> None:
        try:
            sock = socket.socket(self._family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            self._finish(ProbeResult(False, f"no socket: {exc}"))
            return
        self._sock, self._fd = sock, sock.fileno()
        self._deadline = self._io.add_deadline(self, self._check.timeout_s)
        code = sock.connect_ex(self._target)
        if code == 0 or (code == errno.EINPROGRESS and self._established()):
            self._connected()
        elif code == errno.EINPROGRESS:
            self._io.watch(self._fd, True, self._on_connect)
        else:
            self._finish(self._refused(code))

    def _established(self) -> bool:
        """Whether the handshake is already done: to a local port (user mode's mappings)
        the kernel completes it within ``connect``, and waiting for the socket to turn
        writable would only cost another trip through the poller."""
        assert self._sock is not None
        try:
            self._sock.getpeername()
        except OSError:
            return False  # still connecting (or refused: the writable wait tells)
        return True

    def _on_connect(self) -> None:
        assert self._sock is not None
        code = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._finish(self._refused(code))
        else:
            self._connected()

    def _refused(self, code: int) -> ProbeResult:
        host, port = self._target
        return ProbeResult(False, f"connect to {host}:{port}: {os.strerror(code)}")

    def _connected(self) -> None:
        if self._pending is None:
            self._finish(PASSED)  # tcp: the connection was accepted
        else:
            self._send()

    def _send(self) -> None:
        assert self._sock is not None and self._pending is not None
        try:
            sent = self._sock.send(self._pending)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._finish(ProbeResult(False, f"sending the request: {exc}"))
            return
        self._pending = self._pending[sent:]
        if self._pending:
            self._io.watch(self._fd, True, self._send)  # the rest once there is room
        else:
            self._io.watch(self._fd, False, self._receive)

    def _receive(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(MAX_HTTP_HEAD)
        except BlockingIOError:
            return  # woken for nothing: wait on
        except OSError as exc:
            self._finish(ProbeResult(False, f"reading the answer: {exc}"))
            return
        self._head += data
        if data and b"\r\n" not in self._head and len(self._head) < MAX_HTTP_HEAD:
            return
        self._finish(judge_http_head(self._head, self._check))

    def abandon(self) -> None:
        """Close without a result: no callback, socket or registration is left behind."""
        self._deadline = -1
        self._finished = True
        self._close()

    def timed_out(self) -> None:
        self._deadline = -1
        self._finish(ProbeResult(False, f"timed out after {self._check.timeout_s:g}s"))

    def _close(self) -> None:
        if self._sock is not None:
            self._io.forget(self._fd)
            self._sock.close()
            self._sock = None

    def _finish(self, result: ProbeResult) -> None:
        if self._finished:
            return
        self._finished = True
        if self._deadline >= 0:
            self._io.remove_deadline(self, self._deadline)
        self._close()
        self._done(result)


async def probe(engine: HostEngine, record: InstanceRecord, check: HealthCheckSpec) -> ProbeResult:
    """One check as a coroutine, within its timeout (exec, https, a named host)."""
    try:
        with anyio.fail_after(check.timeout_s):
            if check.type == "exec":
                return await _probe_exec(engine, record.id, check)
            host, port = probe_target(
                record,
                check.port,
                bridge=engine.ctx.bridge is not None,
                publish_addr=engine.ctx.network.publish_addr,
            )
            if check.type == "tcp":
                stream = await anyio.connect_tcp(host, port)
                await stream.aclose()
                return PASSED
            return await _probe_http(host, port, check)
    except TimeoutError:
        return ProbeResult(False, f"timed out after {check.timeout_s:g}s")
    except Exception as exc:
        return ProbeResult(
            False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        )


async def _probe_http(host: str, port: int, check: HealthCheckSpec) -> ProbeResult:
    if check.scheme == "https":
        # A health check asks whether the app answers, not who it is: no verification.
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        stream: ByteStream = await anyio.connect_tcp(
            host, port, ssl_context=tls, tls_standard_compatible=False
        )
    else:
        stream = await anyio.connect_tcp(host, port)
    async with stream:
        await stream.send(http_request(check, host, port))
        head = b""
        while b"\r\n" not in head and len(head) < MAX_HTTP_HEAD:
            try:
                head += await stream.receive()
            except anyio.EndOfStream:
                break
    return judge_http_head(head, check)


async def _probe_exec(engine: HostEngine, instance_id: str, check: HealthCheckSpec) -> ProbeResult:
    hub = engine.ctx.agent
    if hub is None:
        return ProbeResult(False, "this host has no guest agent")
    request: dict[str, object] = {"command": list(check.command), "tty": False}
    if check.working_dir:
        request["cwd"] = check.working_dir
    output = bytearray()
    async with await hub.open_session(instance_id, "exec") as session:
        await session.send(Frame.json(request))
        await session.send_eof()
        while True:
            try:
                frame = await session.receive()
            except anyio.EndOfStream:
                return ProbeResult(False, "the agent ended the check without an exit code")
            if not frame.text:
                output += frame.data[: MAX_ERROR_CHARS - len(output)]
                continue
            answer = json.loads(frame.data)
            if "exitCode" in answer:
                code = answer["exitCode"]
                if code == 0:
                    return PASSED
                text = output.decode("utf-8", errors="replace").strip()
                return ProbeResult(False, f"exit code {code}" + (f": {text}" if text else ""))
            if "error" in answer:
                return ProbeResult(False, str(answer["error"]))
