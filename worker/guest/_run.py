"""Run one external command for asset preparation (``worker.run.run_command``); a failure
becomes GuestAssetError with the command's stderr tail."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from worker.run import CommandFailed, run_command, tail

from .errors import GuestAssetError

__all__ = ["run"]

_TAIL_LINES: Final = 20
#: Bound of one step: the slowest are downloading a kernel package and packing an initrd.
_TIMEOUT_S: Final = 900.0


async def run(
    argv: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
) -> bytes:
    """Run ``argv`` to completion (``input`` on its stdin) and return its stdout."""
    try:
        return await run_command(argv, _TIMEOUT_S, input=input, cwd=cwd, env=env)
    except CommandFailed as exc:
        if exc.returncode is None:
            raise GuestAssetError(f"{exc.command}: {exc.stderr}") from exc
        raise GuestAssetError(
            f"command failed with exit code {exc.returncode}: {exc.command}",
            stderr_tail=tail(exc.stderr, _TAIL_LINES, sep="\n"),
        ) from exc
