"""The host side of the guest control channel: one line out, one line back.

The guest's init answers on a serial port whose host end is a unix socket (QEMU), or on a
virtio console whose host end is a pty (Cloud Hypervisor; the path given is then a symlink
to that pty). Bytes sent before the guest opened its end are lost in the UART, so every
conversation starts with ``ping <token>`` until ``pong <token>`` comes back; only then is
the real request sent, and the next line is its answer.

The token is the conversation's own. The init answers one line at a time, in order, to
whoever listens then: a conversation abandoned by its timeout (the VMM watcher asks
``status`` with a one-second bound) leaves answers that reach the *next* conversation. A
bare ``pong`` cannot tell whose ping it answers; with the token, everything before this
conversation's ``pong <token>`` is skipped, so an earlier ``status`` answer is never taken
for a ``mount`` or ``umount`` answer. A pty also keeps what the guest wrote while nobody
listened, so that is flushed first.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import termios
import tty
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream

from natsbus.backoff import Backoff
from schemas.errors import HypervisorError

__all__ = ["GuestControlError", "guest_request", "wait_for_guest"]


class GuestControlError(HypervisorError):
    """The guest did not answer, or answered ``err ...``."""


class _PtyStream(ByteStream):
    """A pty's host end as a byte stream (non-blocking reads and writes on its fd)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def open(cls, path: Path) -> _PtyStream:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            tty.setraw(fd)  # no echo, no line editing: the guest's bytes as they are
            termios.tcflush(fd, termios.TCIFLUSH)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise anyio.ClosedResourceError
        return self._fd

    async def receive(self, max_bytes: int = 65536) -> bytes:
        fd = self._require_fd()
        while True:
            try:
                data = os.read(fd, max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(fd)
                continue
            except OSError as exc:  # EIO: the VMM holding the other end is gone
                raise anyio.BrokenResourceError from exc
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        fd = self._require_fd()
        view = memoryview(item)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                await anyio.wait_writable(fd)
            except OSError as exc:
                raise anyio.BrokenResourceError from exc

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            anyio.notify_closing(fd)
            os.close(fd)


#: What the channel's stream raises once the VMM holding its other end is gone.
_CLOSED = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)


class _Channel:
    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        self._pong = ""

    async def ask(self, line: str, timeout_s: float) -> str:
        """Send ``line`` and return the guest's answer (after :meth:`handshake`)."""
        await self._send(line)
        with anyio.fail_after(timeout_s):
            while True:
                reply = await self._receive()
                # The handshake may have pinged more than once: those answers come first.
                if reply != self._pong:
                    return reply

    async def handshake(self, timeout_s: float) -> None:
        """Ping until the guest answers this conversation's ping; skip all before it."""
        self._pong = f"pong {secrets.token_hex(6)}"
        ping = self._pong.replace("pong", "ping", 1)
        backoff = Backoff(first_s=0.5, max_s=4.0)
        with anyio.fail_after(timeout_s):
            while True:
                await self._send(ping)
                with anyio.move_on_after(backoff.advance()):
                    while await self._receive() != self._pong:
                        pass  # an answer to an earlier, abandoned conversation
                    return

    async def _send(self, line: str) -> None:
        try:
            await self._stream.send(line.encode() + b"\n")
        except _CLOSED as exc:  # the VMM holding the other end exited
            raise GuestControlError("guest control channel closed by the VMM") from exc

    async def _receive(self) -> str:
        try:
            raw = await self._reader.receive_until(b"\n", 65536)
        except _CLOSED as exc:
            raise GuestControlError("guest control channel closed by the VMM") from exc
        return raw.decode(errors="replace").strip("\r\n ")


@contextlib.asynccontextmanager
async def _open(path: Path, timeout_s: float) -> AsyncIterator[_Channel]:
    stream: ByteStream
    try:
        if path.is_char_device():
            stream = _PtyStream.open(path)
        else:
            with anyio.fail_after(min(timeout_s, 5)):
                stream = await anyio.connect_unix(path)
    except (OSError, TimeoutError) as exc:
        raise GuestControlError(f"guest control channel unreachable: {exc}") from exc
    async with stream:
        channel = _Channel(stream)
        try:
            await channel.handshake(timeout_s)
        except TimeoutError:
            raise GuestControlError(f"guest did not answer within {timeout_s:g}s") from None
        yield channel


async def guest_request(path: Path, line: str, *, timeout_s: float = 30.0) -> str:
    """Send one request; return the reply, raising GuestControlError on ``err ...``.

    ``timeout_s`` bounds the whole conversation: reaching the guest and its answer.
    """
    what = line.split()[0]
    try:
        with anyio.fail_after(timeout_s):
            async with _open(path, timeout_s) as channel:
                reply = await channel.ask(line, timeout_s)
    except TimeoutError:
        raise GuestControlError(f"guest did not answer {what!r} within {timeout_s:g}s") from None
    if reply.startswith("err"):
        raise GuestControlError(f"guest: {reply[3:].strip() or 'error'}")
    return reply


async def wait_for_guest(path: Path, *, timeout_s: float) -> str:
    """Wait until the guest's init answers; return its status line."""
    return await guest_request(path, "status", timeout_s=timeout_s)
