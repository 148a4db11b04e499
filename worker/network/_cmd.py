"""Running ``ip``, ``nft`` and ``tc`` (``worker.run.run_command``): a failure becomes a
HypervisorError quoting the tool's stderr."""

from __future__ import annotations

from typing import Final

from schemas.errors import HypervisorError
from worker.run import CommandFailed, run_command

__all__ = ["run_tool"]

_TIMEOUT_S: Final = 30.0


async def run_tool(argv: list[str], *, stdin: bytes = b"", check: bool = True) -> bytes | None:
    """The tool's stdout; None when it failed and ``check`` is off."""
    try:
        return await run_command(argv, _TIMEOUT_S, input=stdin)
    except CommandFailed as exc:
        if exc.returncode is None:
            raise HypervisorError(f"{argv[0]} failed: {exc.stderr}") from exc
        if not check:
            return None
        error = exc.stderr.strip()
        raise HypervisorError(f"{' '.join(argv)} exited {exc.returncode}: {error}") from exc
