"""The rules of a sleeping instance's ports, without a VM: a real listening socket, real
client connections, and a TCP echo server standing in for the guest."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import pytest
from anyio.abc import ByteStream, SocketStream

from worker.wake.sleeper import HeldConnection, Listener, Sleeper, WakeSettings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class FakeWorker:
    """The backend: restores by the script it is given, connects to the echo "guest"."""

    guest_port: int
    failures: int = 0
    restore_delay_s: float = 0.05
    never_wakes: bool = False
    sleeper: Sleeper | None = None
    restores: int = 0
    handed_off: list[int] = field(default_factory=list)
    open: int = 0
    woke_causes: list[str] = field(default_factory=list)
    answers: int = 0

    async def restore(self) -> None:
        self.restores += 1
        await anyio.sleep(self.restore_delay_s)
        if self.never_wakes:
            await anyio.sleep_forever()
        if self.restores <= self.failures:
            raise RuntimeError("restore failed: the snapshot is unreadable")
        assert self.sleeper is not None
        self.sleeper.vm_running()

    async def connect(self, guest_port: int) -> ByteStream:
        return await anyio.connect_tcp("127.0.0.1", self.guest_port)

    async def hand_off(self, listeners: list[Listener]) -> None:
        self.handed_off += [listener.host_port for listener in listeners]

    def opened(self, conn: HeldConnection) -> None:
        self.open += 1

    def closed(self, conn: HeldConnection) -> None:
        self.open -= 1

    def answered(self) -> None:
        self.answers += 1

    def woke(self, cause: str, seconds: float, running_s: float) -> None:
        self.woke_causes.append(cause)


async def _echo(stream: SocketStream) -> None:
    async with stream:
        async for chunk in stream:
            await stream.send(b"guest:" + chunk)


@pytest.fixture
async def guest_port() -> AsyncIterator[int]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, _echo)
        yield listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()


def _listener() -> Listener:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return Listener(host_port=sock.getsockname()[1], guest_port=80, sock=sock)


async def _ask(port: int, word: bytes) -> bytes:
    """Connect, send ``word``, read the answer (b"" when the connection is closed)."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(word)
        try:
            return await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
            return b""


def _sleeper(worker: FakeWorker, settings: WakeSettings) -> tuple[Sleeper, int]:
    listener = _listener()
    sleeper = Sleeper("inst-1", [listener], worker, settings)
    worker.sleeper = sleeper
    return sleeper, listener.host_port


async def test_connections_during_one_wake_are_all_served_in_order(guest_port: int) -> None:
    worker = FakeWorker(guest_port, restore_delay_s=0.3)
    sleeper, port = _sleeper(worker, WakeSettings())
    answers: dict[int, bytes] = {}

    async def client(n: int) -> None:
        answers[n] = await _ask(port, f"hello-{n}".encode())

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper.run)
        for n in range(20):
            tg.start_soon(client, n)
            await anyio.sleep(0.005)
    assert answers == {n: f"guest:hello-{n}".encode() for n in range(20)}
    assert worker.restores == 1
    assert worker.handed_off == [port]
    assert worker.woke_causes == ["connection"]
    assert worker.open == 0  # every connection reported closed again
    with pytest.raises(OSError):  # the worker let go of the port
        await _ask(port, b"late")


async def test_a_failed_wake_closes_the_held_connections_and_the_next_one_retries(
    guest_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    worker = FakeWorker(guest_port, failures=1)
    sleeper, port = _sleeper(worker, WakeSettings(backoff_s=0.2))
    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper.run)
        assert await _ask(port, b"first") == b""  # closed, not left hanging
        assert "the wake failed (restore failed: the snapshot is unreadable)" in caplog.text
        assert await _ask(port, b"second") == b"guest:second"
    assert worker.restores == 2
    assert worker.handed_off == [port]


async def test_a_flood_gets_one_restore_and_a_bounded_queue(
    guest_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    worker = FakeWorker(guest_port, restore_delay_s=1.0)
    sleeper, port = _sleeper(worker, WakeSettings(max_held=3, full_wait_s=0.1))
    answers: list[bytes] = []

    async def client(n: int) -> None:
        answers.append(await _ask(port, b"x"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper.run)
        for n in range(8):
            tg.start_soon(client, n)
    assert worker.restores == 1
    assert answers.count(b"guest:x") >= 3
    assert answers.count(b"") >= 1
    assert "connections wait already (the limit)" in caplog.text


async def test_a_wake_that_takes_too_long_closes_the_held_connection(
    guest_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    worker = FakeWorker(guest_port, never_wakes=True)
    sleeper, port = _sleeper(worker, WakeSettings(hold_timeout_s=0.3))
    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper.run)
        assert await _ask(port, b"anyone?") == b""
        sleeper.close()
    assert "the instance did not wake within 0.3s" in caplog.text
    assert worker.open == 0


async def test_a_restore_through_the_api_hands_the_port_over_without_a_second_restore(
    guest_port: int,
) -> None:
    worker = FakeWorker(guest_port)
    sleeper, port = _sleeper(worker, WakeSettings())
    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper.run)
        await anyio.sleep(0.05)
        sleeper.restore_started("api")
        sleeper.vm_running()
    assert worker.restores == 0
    assert worker.handed_off == [port]
    assert worker.woke_causes == ["api"]
