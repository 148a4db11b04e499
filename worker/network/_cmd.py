"""Running ``ip`` and ``nft``: a failure becomes a HypervisorError quoting the tool's stderr."""

from __future__ import annotations

import anyio

from schemas.errors import HypervisorError

__all__ = ["run_tool"]


async def run_tool(argv: list[str], *, stdin: bytes = b"", check: bool = True) -> bytes | None:
    """The tool's stdout; None when it failed and ``check`` is off."""
    try:
        with anyio.fail_after(30):
            done = await anyio.run_process(argv, input=stdin, check=False)
    except (OSError, TimeoutError) as exc:
        raise HypervisorError(f"{argv[0]} failed: {exc!r}") from exc
    if done.returncode != 0:
        if not check:
            return None
        error = done.stderr.decode(errors="replace").strip()
        raise HypervisorError(f"{' '.join(argv)} exited {done.returncode}: {error}")
    return bytes(done.stdout)
