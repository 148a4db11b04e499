"""The channel's framing (Python side), flow control against the real agent binary run on
the host (``-channel unix:PATH``: no guest needed), and the agent's own Go tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from worker.agent import AgentHub, AgentProtocolError, Frame
from worker.agent.protocol import MAX_TEXT, SYNC, WINDOW, FrameParser, Kind, cost, encode
from worker.drivers.base import AgentEndpoint
from worker.guest import DEFAULT_AGENT

SOURCES = Path(__file__).parents[3] / "guest-agent"


def test_bytes_before_the_marker_are_dropped_and_frames_may_arrive_in_pieces() -> None:
    stream = (
        b"tail of a cut frame"
        + SYNC
        + encode(Kind.HELLO, 0, b"{}")
        + encode(Kind.BINARY, 7, b"x" * 1000)
    )
    parser = FrameParser()
    frames = [f for i in range(0, len(stream), 5) for f in parser.feed(stream[i : i + 5])]
    assert [(f.kind, f.sid, len(f.payload)) for f in frames] == [
        (Kind.HELLO, 0, 2),
        (Kind.BINARY, 7, 1000),
    ]


def test_garbage_after_a_frame_realigns_on_the_next_marker() -> None:
    parser = FrameParser()
    stream = SYNC + encode(Kind.TEXT, 1, b"{}") + b"\xa9\x12\x00" + SYNC + encode(Kind.PONG, 0)
    assert [f.kind for f in parser.feed(stream)] == [Kind.TEXT, Kind.PONG]


def test_a_text_frame_is_limited() -> None:
    with pytest.raises(AgentProtocolError):
        encode(Kind.TEXT, 1, b"x" * (MAX_TEXT + 1))


@pytest.fixture
def agent_socket() -> Iterator[Path]:
    if not DEFAULT_AGENT.is_file():
        pytest.fail(f"no agent at {DEFAULT_AGENT}: run scripts/install.sh")
    tmp = Path(tempfile.mkdtemp(prefix="vfag", dir="/tmp"))
    path = tmp / "agent.sock"
    process = subprocess.Popen([str(DEFAULT_AGENT), "-channel", f"unix:{path}"])
    try:
        yield path
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
async def hub(agent_socket: Path) -> AsyncIterator[AgentHub]:
    async with AgentHub() as hub:
        hub.attach("host", AgentEndpoint(socket=str(agent_socket)))
        await hub.wait_ready("host", 10)
        yield hub


@pytest.mark.anyio
async def test_a_receiver_that_does_not_read_holds_at_most_a_window(hub: AgentHub) -> None:
    total = 16 << 20
    async with await hub.open_session("host", "exec") as session:
        await session.send(Frame.json({"command": ["head", "-c", str(total), "/dev/zero"]}))
        await anyio.sleep(1)  # the agent could send it all in far less; credit stops it
        assert session._buffered <= WINDOW + cost(MAX_TEXT)
        received = 0
        try:
            while True:
                frame = await session.receive()
                if not frame.text:
                    received += len(frame.data)
        except anyio.EndOfStream:
            pass
    assert received == total


@pytest.mark.anyio
async def test_output_left_in_the_pipe_when_the_command_exits_is_all_sent(hub: AgentHub) -> None:
    # More than a window: the command exits while the rest waits in the pipe for credit.
    total = WINDOW + (40 << 10)
    async with await hub.open_session("host", "exec") as session:
        await session.send(Frame.json({"command": ["head", "-c", str(total), "/dev/zero"]}))
        await anyio.sleep(1)
        received, texts = 0, []
        try:
            while True:
                frame = await session.receive()
                if frame.text:
                    texts.append(frame.data)
                else:
                    received += len(frame.data)
        except anyio.EndOfStream:
            pass
    assert (received, texts) == (total, [b'{"exitCode":0}'])


@pytest.mark.anyio
async def test_cp_to_sets_every_mode_bit(hub: AgentHub, agent_socket: Path) -> None:
    target = agent_socket.parent / "tool"
    async with await hub.open_session("host", "cp") as session:
        entry = {"direction": "to", "guest_path": str(target), "is_dir": False, "mode": 0o4755}
        await session.send(Frame.json(entry))
        await session.send(Frame(False, b"#!/bin/sh\n"))
        await session.send(Frame.json({"type": "end"}))
        reply = await session.receive()
    assert reply.text and b'"success":true' in reply.data
    assert target.stat().st_mode & 0o7777 == 0o4755


@pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain (scripts/install.sh)")
def test_go_vet_and_go_test() -> None:
    for argv in (["go", "vet", "./..."], ["go", "test", "./..."]):
        done = subprocess.run(argv, cwd=SOURCES, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
