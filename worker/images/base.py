"""What the parts of the image cache share: digests, time bounds, the command runner."""

from __future__ import annotations

import re
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread

__all__ = ["DIGEST", "Runner", "Timeouts", "digest_hex", "remove_tree"]

DIGEST: Final = re.compile(r"sha256:[0-9a-f]{64}")

Runner = Callable[[Sequence[str], float], Awaitable[bytes]]
"""Runs a command with a timeout, returns its stdout, raises ``worker.run.CommandFailed``
(``worker.run.run_command``; tests pass one that records or fails commands)."""


@dataclass(frozen=True)
class Timeouts:
    """Bounds of each external step of a pull, in seconds."""

    resolve_s: float = 30.0
    copy_s: float = 1800.0
    unpack_s: float = 900.0
    mkfs_s: float = 900.0
    gc_s: float = 300.0


def digest_hex(digest: str) -> str:
    """``sha256:<hex>`` → ``<hex>``; ValueError for anything else (it names files)."""
    if not DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest.removeprefix("sha256:")


async def remove_tree(path: Path) -> None:
    if path.exists():
        await anyio.to_thread.run_sync(shutil.rmtree, path, True)
