"""A small QMP client: one connection per operation, events collected while it is open.

QEMU accepts one QMP client at a time. The worker runs one operation per instance at a
time, so each operation opens its own connection and closes it when done; there is no
pool that could hold a connection to a QEMU that has since been replaced.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from schemas.errors import HypervisorError

__all__ = ["QmpClient", "QmpError", "open_qmp"]

_MAX_LINE = 16 * 1024 * 1024


class QmpError(HypervisorError):
    """QEMU answered a command with an error, or the connection failed."""


class QmpClient:
    def __init__(self, stream: SocketStream) -> None:
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Send one command and return its ``return`` value; raise QmpError on ``error``."""
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = arguments
        try:
            await self._stream.send(json.dumps(request).encode() + b"\n")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise QmpError(f"QMP {command}: connection closed by QEMU") from exc
        while True:
            message = await self._read()
            if "event" in message:
                self.events.append(message)
            elif message.get("id") == self._next_id:
                if "error" in message:
                    error = message["error"]
                    raise QmpError(f"QMP {command}: {error.get('desc', error)}")
                return message.get("return")

    async def wait_event(
        self,
        name: str,
        timeout_s: float,
        match: Callable[[dict[str, Any]], bool] = lambda data: True,
    ) -> dict[str, Any]:
        """Return the first ``name`` event whose data ``match``es, seen since the connection
        opened or yet to come."""
        with anyio.fail_after(timeout_s):
            while True:
                for event in self.events:
                    if event["event"] == name and match(event.get("data", {})):
                        self.events.remove(event)
                        return event
                message = await self._read()
                if "event" in message:
                    self.events.append(message)

    async def _read(self) -> dict[str, Any]:
        try:
            line = await self._reader.receive_until(b"\n", _MAX_LINE)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError) as exc:
            raise QmpError("QMP connection closed by QEMU") from exc
        result: dict[str, Any] = json.loads(line)
        return result


@contextlib.asynccontextmanager
async def open_qmp(path: Path, *, timeout_s: float = 5.0) -> AsyncIterator[QmpClient]:
    """Connect, read the greeting and enter command mode."""
    try:
        with anyio.fail_after(timeout_s):
            stream = await anyio.connect_unix(path)
    except (OSError, TimeoutError) as exc:
        raise QmpError(f"cannot connect to QMP at {path}: {exc}") from exc
    async with stream:
        client = QmpClient(stream)
        with anyio.fail_after(timeout_s):
            greeting = await client._read()
            if "QMP" not in greeting:
                raise QmpError(f"unexpected QMP greeting: {greeting}")
            await client.execute("qmp_capabilities")
        yield client
