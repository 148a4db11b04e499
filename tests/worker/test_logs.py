"""Log files to log lines: order, no gaps, rotation, long lines, resuming after a restart."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anyio
import pytest

from schemas.codec import decode_log_line
from schemas.messages import LogLine
from schemas.subjects import Subjects
from worker.filewatch import FileWatcher
from worker.logs import LogFollower, split_line

pytestmark = pytest.mark.anyio


class Collector:
    def __init__(self) -> None:
        self.lines: list[LogLine] = []
        self.ids: list[str] = []

    async def __call__(self, subject: str, payload: bytes, msg_id: str) -> None:
        self.lines.append(decode_log_line(payload))
        self.ids.append(msg_id)

    def texts(self, source: str = "app") -> list[str]:
        return [line.line for line in self.lines if line.source == source]


async def follow_until(follower: LogFollower, done: object, timeout_s: float = 10) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(follower.run)
        with anyio.fail_after(timeout_s):
            while not done():  # type: ignore[operator]
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()


def follower(logs: Path, sink: Collector, **options: int) -> LogFollower:
    return LogFollower("inst", logs, Subjects("t"), sink, **options)  # type: ignore[arg-type]


async def test_lines_in_order_without_carriage_returns(tmp_path: Path) -> None:
    (tmp_path / "app.log").write_bytes(b"one\r\ntwo\nthree-partial")
    sink = Collector()
    await follow_until(follower(tmp_path, sink), lambda: len(sink.lines) >= 2)
    assert sink.texts() == ["one", "two"]
    assert [line.seq for line in sink.lines] == [1, 2]


@pytest.mark.parametrize(
    "append",
    [True, False],
    ids=["O_APPEND writer (QEMU)", "writer at its own offset (Cloud Hypervisor's serial file)"],
)
async def test_rotation_loses_and_repeats_nothing(tmp_path: Path, append: bool) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    sink = Collector()
    watcher = follower(tmp_path, sink, max_file_bytes=200)

    async def write() -> None:
        fd = os.open(log, os.O_WRONLY | (os.O_APPEND if append else 0))
        try:
            for i in range(1, 301):
                os.write(fd, f"line {i}\n".encode())
                await anyio.sleep(0.001)
        finally:
            os.close(fd)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher.run)
        await write()
        with anyio.fail_after(10):
            while len(sink.texts()) < 300:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert sink.texts() == [f"line {i}" for i in range(1, 301)]
    assert (tmp_path / "app.log.1").exists()
    if append:
        assert log.stat().st_size < 300 * 9


async def test_a_replaced_file_is_read_to_its_end_first(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"a\nb\n")
    sink = Collector()
    async with anyio.create_task_group() as tg:
        tg.start_soon(follower(tmp_path, sink).run)
        with anyio.fail_after(5):
            while len(sink.texts()) < 2:
                await anyio.sleep(0.01)
        with open(log, "ab") as out:
            out.write(b"c\n")
        log.rename(tmp_path / "app.log.old")
        log.write_bytes(b"d\n")
        with anyio.fail_after(5):
            while len(sink.texts()) < 4:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert sink.texts() == ["a", "b", "c", "d"]


async def test_long_line_is_split_not_dropped(tmp_path: Path) -> None:
    (tmp_path / "app.log").write_bytes(b"x" * 250 + b"\n")
    sink = Collector()
    await follow_until(follower(tmp_path, sink, max_line_bytes=100), lambda: len(sink.lines) >= 3)
    assert [len(t) for t in sink.texts()] == [100, 100, 50]


async def test_restart_resumes_where_it_stopped(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"1\n2\n")
    first = Collector()
    await follow_until(follower(tmp_path, first), lambda: len(first.lines) >= 2)
    with open(log, "ab") as out:
        out.write(b"3\n")
    second = Collector()
    await follow_until(follower(tmp_path, second), lambda: len(second.lines) >= 1)
    await anyio.sleep(0.05)
    assert second.texts() == ["3"]
    assert [line.seq for line in second.lines] == [3]
    assert second.ids == ["inst.app.3"]


async def test_a_file_made_after_following_started_is_followed(tmp_path: Path) -> None:
    sink = Collector()

    async def write_later() -> None:
        await anyio.sleep(0.1)
        (tmp_path / "vmm.log").write_bytes(b"vmm started\n")

    async with anyio.create_task_group() as tg:
        tg.start_soon(write_later)
        await follow_until(follower(tmp_path, sink), lambda: sink.texts("vmm"))
    assert sink.texts("vmm") == ["vmm started"]


async def test_follower_ends_when_its_directory_is_removed(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_bytes(b"first\n")
    sink = Collector()
    async with anyio.create_task_group() as tg:
        tg.start_soon(follower(logs, sink).run)
        with anyio.fail_after(5):
            while not sink.lines:
                await anyio.sleep(0.01)
        with open(logs / "app.log", "ab") as out:
            out.write(b"last, unterminated")
        shutil.rmtree(logs)
        # The follower ends by itself: the task group exits without being cancelled.
        with anyio.fail_after(5):
            while sink.texts() != ["first", "last, unterminated"]:
                await anyio.sleep(0.01)
    assert sink.texts() == ["first", "last, unterminated"]


async def test_followers_of_one_directory_share_one_watch(tmp_path: Path) -> None:
    watcher = FileWatcher()
    woken: list[str] = []

    async def follow(name: str) -> None:
        with watcher.subscribe(tmp_path / name) as changes:
            await changes.wait()  # the first wait returns at once: read what is there
            await changes.wait()
            woken.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher.run)
        for name in ["app.log", "app.log", "vmm.log"]:
            tg.start_soon(follow, name)
        await anyio.sleep(0.1)
        assert watcher.watches == 1
        (tmp_path / "app.log").write_bytes(b"x\n")
        with anyio.fail_after(5):
            while len(woken) < 2:
                await anyio.sleep(0.01)
        assert woken == ["app.log", "app.log"]
        tg.cancel_scope.cancel()
    assert watcher.watches == 0


def test_split_keeps_utf8_characters_whole() -> None:
    pieces = split_line("é".encode() * 10, 5)
    assert all(piece.decode() for piece in pieces)
    assert b"".join(pieces) == "é".encode() * 10
