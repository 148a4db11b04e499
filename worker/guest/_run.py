"""Run one external command for asset preparation; failures become GuestAssetError."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio

from .errors import GuestAssetError

__all__ = ["run", "tail"]

_TAIL_LINES = 20


def tail(data: bytes, lines: int = _TAIL_LINES) -> str:
    """The last ``lines`` lines of ``data``, decoded leniently."""
    text = data.decode("utf-8", "replace").rstrip()
    return "\n".join(text.splitlines()[-lines:])


async def run(
    argv: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
) -> bytes:
    """Run ``argv`` to completion (``input`` on its stdin) and return its stdout.

    anyio.run_process always reaps the child, also when the caller is cancelled.
    A missing program or a non-zero exit raises GuestAssetError with the stderr tail.
    """
    cmd = [str(a) for a in argv]
    try:
        result = await anyio.run_process(cmd, input=input, cwd=cwd, env=env, check=False)
    except OSError as exc:
        raise GuestAssetError(f"cannot run {cmd[0]}: {exc}") from exc
    if result.returncode != 0:
        raise GuestAssetError(
            f"command failed with exit code {result.returncode}: {shlex.join(cmd)}",
            stderr_tail=tail(result.stderr),
        )
    return result.stdout
