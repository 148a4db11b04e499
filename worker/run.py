"""The worker's one way to run an external command (skopeo, umoci, mkfs.ext4, ip, nft, cpio...).

:func:`run_command` runs ``argv`` with anyio (``anyio.run_process``: the child is always
waited for, also when the caller is cancelled or the time bound kills it), captures stdout
and stderr, and raises :class:`CommandFailed` — carrying the command, its exit status and
its stderr — for a non-zero exit, a missing program or a command past its time bound.

Callers translate :class:`CommandFailed` into their own domain's error (a registry error
for skopeo, ``HypervisorError`` for ``ip``/``nft``, ``GuestAssetError`` for asset builds):
this module knows no domain. Long-lived children (VMMs, virtiofsd) are not run here; they
have their own supervision in ``worker.proc``.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio

__all__ = ["CommandFailed", "run_command", "tail"]

_TAIL_LINES = 3


class CommandFailed(Exception):
    """An external command exited non-zero, could not start, or ran past its time bound.

    ``returncode`` is None when the command has no exit status of its own (it timed out or
    never started); ``stderr`` is its captured stderr, or why it could not run.
    """

    def __init__(
        self,
        argv: Sequence[str | Path],
        returncode: int | None,
        stderr: str,
        *,
        timed_out: bool | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.returncode = returncode
        self.stderr = stderr
        self._timed_out = returncode is None if timed_out is None else timed_out
        outcome = "timed out" if self._timed_out else _outcome(returncode)
        super().__init__(f"{Path(self.argv[0]).name} {outcome}: {tail(stderr)}")

    @property
    def timed_out(self) -> bool:
        return self._timed_out

    @property
    def command(self) -> str:
        """The command line, quoted as a shell would need it (for error messages)."""
        return shlex.join(self.argv)


async def run_command(
    argv: Sequence[str | Path],
    timeout_s: float,
    *,
    input: bytes | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> bytes:
    """Run ``argv`` to completion within ``timeout_s`` and return its stdout.

    ``input`` goes to its stdin (else stdin is ``/dev/null``, so a tool that would prompt
    fails instead of waiting). Raises :class:`CommandFailed` for every failure.
    """
    cmd = [str(a) for a in argv]
    stdin = None if input is not None else subprocess.DEVNULL
    try:
        with anyio.fail_after(timeout_s):
            done = await anyio.run_process(
                cmd, input=input, stdin=stdin, cwd=cwd, env=env, check=False
            )
    except TimeoutError:
        raise CommandFailed(cmd, None, f"no result after {timeout_s:g}s") from None
    except OSError as exc:
        raise CommandFailed(cmd, None, f"cannot run {cmd[0]}: {exc}", timed_out=False) from exc
    if done.returncode != 0:
        raise CommandFailed(cmd, done.returncode, done.stderr.decode(errors="replace"))
    return bytes(done.stdout)


def tail(text: str | bytes, lines: int = _TAIL_LINES, *, sep: str = " ") -> str:
    """The last ``lines`` non-blank lines of ``text``, joined by ``sep``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return sep.join(kept[-lines:])


def _outcome(returncode: int | None) -> str:
    return "could not start" if returncode is None else f"exited {returncode}"
