"""The host side of the guest control channel against a slow guest: an answer meant for a
conversation that gave up never becomes the answer of the next one.

The stand-in behaves as the real pair does: QEMU serves one client of the socket at a time
and drops what the guest writes while no client is connected; the init reads one line at a
time, answers in order, and takes its time (a guest under TCG on a busy host).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from worker.guest.control import GuestControlError, guest_request

pytestmark = pytest.mark.anyio


class SlowGuest:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.lines_in, self._lines_out = anyio.create_memory_object_stream[str](100)
        self.client: SocketStream | None = None
        self.seen: list[str] = []

    def answer(self, line: str) -> str:
        words = line.split()
        match words[0]:
            case "ping":
                return " ".join(["pong", *words[1:2]])
            case "status":
                return "running 42"
            case _:
                return "ok"

    async def init(self) -> None:
        """The init's control loop: one line at a time, each taking a while."""
        async for line in self._lines_out:
            self.seen.append(line)
            await anyio.sleep(self.delay_s)
            if self.client is not None:  # nobody listening: QEMU drops the bytes
                await self.client.send(self.answer(line).encode() + b"\n")

    async def serve(self, client: SocketStream) -> None:
        """QEMU's side of the socket: one client at a time, its lines go to the guest."""
        self.client = client
        reader = BufferedByteReceiveStream(client)
        try:
            while True:
                line = await reader.receive_until(b"\n", 1024)
                await self.lines_in.send(line.decode())
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
            pass
        finally:
            self.client = None


@pytest.fixture
async def slow_guest(tmp_path: Path) -> AsyncIterator[tuple[SlowGuest, Path]]:
    path = tmp_path / "control.sock"
    guest = SlowGuest(delay_s=1.6)
    listener = await anyio.create_unix_listener(path)
    async with anyio.create_task_group() as tg:
        tg.start_soon(guest.init)

        async def accept_one_at_a_time() -> None:
            async with listener:
                while True:
                    client = await listener.accept()
                    async with client:
                        await guest.serve(client)

        tg.start_soon(accept_one_at_a_time)
        yield guest, path
        tg.cancel_scope.cancel()


async def test_a_late_answer_is_not_taken_for_the_next_request(
    slow_guest: tuple[SlowGuest, Path],
) -> None:
    guest, path = slow_guest
    # A poll like the VMM watcher's: it pings three times before the first pong comes and
    # gives up before the rest, so the guest still owes it two "pong"s and "running 42".
    with pytest.raises(GuestControlError):
        await guest_request(path, "status", timeout_s=2.0)
    # The next conversation gets those first: none is its handshake's or its request's.
    assert await guest_request(path, "mount serial:vmfleet-vol1 /data rw", timeout_s=30) == "ok"
    assert "mount serial:vmfleet-vol1 /data rw" in guest.seen
