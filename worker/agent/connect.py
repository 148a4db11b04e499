"""Reaching a guest agent's channel from the host: a unix socket, plus Cloud Hypervisor's
hybrid-vsock handshake (``CONNECT <port>\\n`` answered ``OK <port>\\n``)."""

from __future__ import annotations

import anyio
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream

from worker.drivers.base import AgentEndpoint

__all__ = ["open_endpoint"]


class _Prefixed(ByteStream):
    """A stream whose first bytes were already read (past the handshake line)."""

    def __init__(self, stream: ByteStream, first: bytes) -> None:
        self._stream = stream
        self._first = first

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._first:
            data, self._first = self._first[:max_bytes], self._first[max_bytes:]
            return data
        return await self._stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def open_endpoint(endpoint: AgentEndpoint, *, timeout_s: float = 5.0) -> ByteStream:
    """A byte stream to the agent; OSError when the socket is not there or refuses."""
    with anyio.fail_after(timeout_s):
        stream: ByteStream = await anyio.connect_unix(endpoint.socket)
        if endpoint.vsock_port is None:
            return stream
        try:
            await stream.send(f"CONNECT {endpoint.vsock_port}\n".encode())
            reader = BufferedByteReceiveStream(stream)
            line = await reader.receive_until(b"\n", 256)
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            await stream.aclose()
            raise ConnectionRefusedError(f"vsock port {endpoint.vsock_port}: no answer") from exc
        except BaseException:
            await stream.aclose()
            raise
        if not line.startswith(b"OK"):
            await stream.aclose()
            raise ConnectionRefusedError(f"vsock port {endpoint.vsock_port}: {line!r}")
        return _Prefixed(stream, bytes(reader.buffer))
