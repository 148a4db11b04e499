"""The results of commands this host has finished, kept so that a redelivered command is
answered again instead of run again.

JetStream drops a re-sent command with the same id inside its duplicate window; the
ledger covers the other case: the worker finished a command but died before acking it.
Results live as small files under ``<data>/commands/`` and are pruned after a day.

They are written without an fsync: the ledger is for a worker that died (its writes are in
the page cache for the next one), and after a power loss a missing result only means a
redelivered command meets its effect already in the instance record (the record's
``last_command_id``), which answers it as done. One fsync per command would cost
milliseconds of every command's round trip on a busy disk.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import msgspec

from schemas.codec import decode_command_result, encode
from schemas.messages import CommandResult
from schemas.subjects import is_valid_token
from worker.storage import write_atomic

__all__ = ["Ledger"]


class Ledger:
    def __init__(self, root: Path, *, keep_s: float = 86_400.0) -> None:
        self.root = root
        self.keep_s = keep_s
        root.mkdir(parents=True, exist_ok=True)

    def get(self, command_id: str) -> CommandResult | None:
        if not is_valid_token(command_id) or "/" in command_id:
            return None
        try:
            return decode_command_result((self.root / command_id).read_bytes())
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    def put(self, result: CommandResult) -> None:
        if is_valid_token(result.command_id) and "/" not in result.command_id:
            write_atomic(self.root / result.command_id, encode(result), durable=False)

    def prune(self) -> int:
        cutoff = time.time() - self.keep_s
        removed = 0
        for entry in self.root.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
        return removed
