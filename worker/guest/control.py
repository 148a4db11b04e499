"""The host side of the guest control channel: one line out, one line back.

The guest's init answers on a serial port whose host end is a unix socket. Bytes sent
before the guest opened its end are lost in the UART, so every conversation starts with
``ping`` until ``pong`` comes back; only then is the real request sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from schemas.errors import HypervisorError

__all__ = ["GuestControlError", "guest_request", "wait_for_guest"]


class GuestControlError(HypervisorError):
    """The guest did not answer, or answered ``err ...``."""


class _Channel:
    def __init__(self, stream: SocketStream) -> None:
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)

    async def ask(self, line: str, timeout_s: float) -> str:
        await self._stream.send(line.encode() + b"\n")
        with anyio.fail_after(timeout_s):
            while True:
                raw = await self._reader.receive_until(b"\n", 65536)
                reply = raw.decode(errors="replace").strip("\r\n ")
                # A late answer to an earlier handshake ping is not this request's reply.
                if line == "ping" or reply != "pong":
                    return reply

    async def handshake(self, timeout_s: float) -> None:
        wait = 0.5
        with anyio.fail_after(timeout_s):
            while True:
                with anyio.move_on_after(wait):
                    if await self.ask("ping", timeout_s) == "pong":
                        return
                wait = min(wait * 2, 4.0)


@contextlib.asynccontextmanager
async def _open(path: Path, timeout_s: float) -> AsyncIterator[_Channel]:
    try:
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
    """Send one request; return the reply, raising GuestControlError on ``err ...``."""
    async with _open(path, timeout_s) as channel:
        try:
            reply = await channel.ask(line, timeout_s)
        except TimeoutError:
            raise GuestControlError(f"guest did not answer {line.split()[0]!r}") from None
    if reply.startswith("err"):
        raise GuestControlError(f"guest: {reply[3:].strip() or 'error'}")
    return reply


async def wait_for_guest(path: Path, *, timeout_s: float) -> str:
    """Wait until the guest's init answers; return its status line."""
    return await guest_request(path, "status", timeout_s=timeout_s)
