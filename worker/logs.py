"""Shipping log files to the logs stream, one message per line, as they are written.

Each instance has three sources (app: the serial console, vmm: the VMM's output, ops:
vmfleet's own log of actions on it). A follower per file publishes every complete line,
without the console's trailing ``\\r``, with a per-source sequence number. The position
reached is saved beside the logs, so a restarted worker neither loses nor repeats lines
(and the ``Nats-Msg-Id`` of each line lets JetStream drop any repeat inside its window).
A line longer than the limit is split into pieces, never dropped. Rotation is followed:
a file replaced by a new one is read to its end first; a truncated file is read anew.
Followers sleep until inotify reports a change (:mod:`worker.filewatch`, one watch per
log directory shared by its three followers), so idle instances cost no CPU; a follower
whose directory is removed (the instance deleted) reads what is left and ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio

from schemas.clock import utc_now
from schemas.codec import encode
from schemas.messages import LogLine
from schemas.subjects import Subjects
from worker.filewatch import FileWatcher, Subscription
from worker.storage import write_atomic

__all__ = ["LogFollower", "LogShipper", "Publish", "split_line"]

log = logging.getLogger(__name__)

#: Publishes one line: (subject, payload, message id).
Publish = Callable[[str, bytes, str], Awaitable[None]]

SOURCES = {"app": "app.log", "vmm": "vmm.log", "ops": "ops.log"}


def split_line(line: bytes, limit: int) -> list[bytes]:
    """Pieces of at most ``limit`` bytes, cut on UTF-8 character boundaries."""
    pieces = []
    while len(line) > limit:
        cut = limit
        while cut > 0 and (line[cut] & 0xC0) == 0x80:
            cut -= 1
        pieces.append(line[: cut or limit])
        line = line[cut or limit :]
    pieces.append(line)
    return pieces


@dataclass
class _Position:
    inode: int = 0
    #: Bytes of the file read so far (``partial`` included).
    offset: int = 0
    seq: int = 0
    #: The start of a line whose end has not been written yet.
    partial: bytes = b""


class LogFollower:
    """Follows one instance's log files until cancelled or their directory is removed."""

    def __init__(
        self,
        instance_id: str,
        logs_dir: Path,
        subjects: Subjects,
        publish: Publish,
        *,
        max_line_bytes: int = 64 * 1024,
        max_file_bytes: int = 50 << 20,
        on_line: Callable[[str], None] = lambda source: None,
        watcher: FileWatcher | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.logs_dir = logs_dir
        self.subjects = subjects
        self.publish = publish
        self.max_line_bytes = max_line_bytes
        self.max_file_bytes = max_file_bytes
        self.on_line = on_line
        #: Shared by all the host's followers; a follower on its own runs one of its own.
        self.watcher = watcher
        self._state_file = logs_dir / ".positions.json"
        self._positions = self._load_positions()

    async def run(self) -> None:
        if self.watcher is not None:
            await self._follow_all(self.watcher)
            return
        watcher = FileWatcher()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.run)
            await self._follow_all(watcher)
            tg.cancel_scope.cancel()

    async def _follow_all(self, watcher: FileWatcher) -> None:
        async with anyio.create_task_group() as tg:
            for source, name in SOURCES.items():
                path = self.logs_dir / name
                tg.start_soon(self._follow_watched, watcher, source, path)

    async def _follow_watched(self, watcher: FileWatcher, source: str, path: Path) -> None:
        with watcher.subscribe(path) as changes:
            await self._follow(source, path, changes)

    async def _follow(self, source: str, path: Path, changes: Subscription) -> None:
        position = self._positions.setdefault(source, _Position())
        handle: BinaryIO | None = None
        try:
            while True:
                chunk = handle.read(1 << 20) if handle is not None else b""
                if chunk.startswith(b"\0"):
                    chunk = self._skip_hole(position, chunk)
                    if not chunk:
                        continue
                if chunk:
                    await self._ship(source, position, chunk)
                    continue
                if handle is not None and handle.tell() > self.max_file_bytes:
                    self._rotate(path, handle, position)
                    continue
                # At the end of what we hold: has the file been rotated or truncated?
                switched = await self._switch_if_rotated(source, path, handle, position)
                if switched is handle:
                    if changes.gone:  # read to the end after the directory went away
                        await self._flush_partial(source, position)
                        return
                    await changes.wait()
                handle = switched
        finally:
            if handle is not None:
                handle.close()

    def _skip_hole(self, position: _Position, chunk: bytes) -> bytes:
        """A writer that does not append (Cloud Hypervisor's serial file) goes on at its own
        offset after the file is truncated, so the file starts with a hole that reads as
        zero bytes (and takes no disk space): skip it. A VMM writing with O_APPEND leaves
        none."""
        data = chunk.lstrip(b"\0")
        position.offset += len(chunk) - len(data)
        return data

    def _rotate(self, path: Path, handle: BinaryIO, position: _Position) -> None:
        """Keep the file bounded: everything read so far moves to ``<name>.1`` and the file
        is truncated in place (its writer, a VMM, holds it open with O_APPEND and goes on
        writing at the new end). Done right after reading to the end, so only what is
        written in between those two system calls could be missed."""
        handle.seek(0)
        data = handle.read(position.offset)
        write_atomic(path.with_name(path.name + ".1"), data)
        os.truncate(path, 0)
        handle.seek(0)
        position.offset = len(position.partial)
        self._save_positions()

    async def _switch_if_rotated(
        self, source: str, path: Path, handle: BinaryIO | None, position: _Position
    ) -> BinaryIO | None:
        """The handle to read on: the same one, or the file now at ``path``."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            if handle is None or os.fstat(handle.fileno()).st_nlink > 0:
                return handle
            # Deleted, and read to its end: let it go. Held open, it would also keep its
            # directory's removal from being reported (an open file pins its directory).
            await self._flush_partial(source, position)
            handle.close()
            return None
        if handle is not None and stat.st_ino == position.inode:
            if stat.st_size < handle.tell():  # truncated in place (copytruncate)
                handle.seek(0)
                position.offset, position.partial = 0, b""
            return handle
        if handle is not None:
            # Replaced by a new file, and the old one is read to its end: its last,
            # unterminated line is a line too.
            await self._flush_partial(source, position)
            handle.close()
        new = open(path, "rb")  # noqa: SIM115 - held open across iterations on purpose
        if stat.st_ino == position.inode and position.offset <= stat.st_size:
            new.seek(position.offset)
        else:
            position.inode, position.offset, position.partial = stat.st_ino, 0, b""
        return new

    async def _flush_partial(self, source: str, position: _Position) -> None:
        if position.partial:
            await self._publish_line(source, position, position.partial)
            position.partial = b""

    async def _ship(self, source: str, position: _Position, chunk: bytes) -> None:
        *lines, rest = (position.partial + chunk).split(b"\n")
        for raw in lines:
            for piece in split_line(raw.rstrip(b"\r"), self.max_line_bytes):
                await self._publish_line(source, position, piece)
        # A partial last line waits for its end, unless it is already too long to keep.
        if len(rest) > self.max_line_bytes:
            *full, rest = split_line(rest, self.max_line_bytes)
            for piece in full:
                await self._publish_line(source, position, piece)
        position.offset += len(chunk)
        position.partial = rest
        self._save_positions()

    async def _publish_line(self, source: str, position: _Position, line: bytes) -> None:
        position.seq += 1
        message = LogLine(
            instance_id=self.instance_id,
            source=source,  # type: ignore[arg-type]
            seq=position.seq,
            line=line.decode("utf-8", errors="replace"),
            at=utc_now(),
        )
        subject = self.subjects.logs(self.instance_id, source)
        await self.publish(subject, encode(message), f"{self.instance_id}.{source}.{position.seq}")
        self.on_line(source)

    def _load_positions(self) -> dict[str, _Position]:
        try:
            raw = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return {}
        return {source: _Position(**value) for source, value in raw.items()}

    def _save_positions(self) -> None:
        # Saved: where the next unshipped line starts, so a restart re-reads a partial line.
        data = {
            source: {"inode": p.inode, "offset": p.offset - len(p.partial), "seq": p.seq}
            for source, p in self._positions.items()
        }
        with contextlib.suppress(FileNotFoundError):
            _replace(self._state_file, json.dumps(data).encode())


def _replace(path: Path, data: bytes) -> None:
    """Write-then-rename without an fsync: saved after every chunk shipped, so an fsync
    would sit on every line's way. A worker that crashes keeps what it wrote (the page
    cache survives it); only a power loss can take the file back a little, and the lines
    shipped again then carry the same message ids, which JetStream drops as repeats."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


class LogShipper:
    """Keeps one :class:`LogFollower` running per instance that has a log directory."""

    def __init__(
        self,
        guests: Callable[[], dict[str, Path]],
        subjects: Subjects,
        publish: Publish,
        *,
        max_line_bytes: int,
        max_file_bytes: int = 50 << 20,
        on_line: Callable[[str], None] = lambda source: None,
        rescan_s: float = 0.25,
    ) -> None:
        self._guests = guests
        self._subjects = subjects
        self._publish = publish
        self._max_line_bytes = max_line_bytes
        self._max_file_bytes = max_file_bytes
        self._on_line = on_line
        self._rescan_s = rescan_s
        self._running: dict[str, anyio.CancelScope] = {}
        self._watcher = FileWatcher()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watcher.run)
            while True:
                current = self._guests()
                for instance_id, logs_dir in current.items():
                    if instance_id not in self._running:
                        self._running[instance_id] = scope = anyio.CancelScope()
                        tg.start_soon(self._follow, instance_id, logs_dir, scope)
                for instance_id in set(self._running) - set(current):
                    self._running.pop(instance_id).cancel()
                await anyio.sleep(self._rescan_s)

    async def _follow(self, instance_id: str, logs_dir: Path, scope: anyio.CancelScope) -> None:
        follower = LogFollower(
            instance_id,
            logs_dir,
            self._subjects,
            self._publish,
            max_line_bytes=self._max_line_bytes,
            max_file_bytes=self._max_file_bytes,
            on_line=self._on_line,
            watcher=self._watcher,
        )
        with scope:
            try:
                await follower.run()
            except Exception as exc:  # a follower must not take the worker down
                log.warning("log follower of %s stopped: %s", instance_id, exc)
        self._running.pop(instance_id, None)
