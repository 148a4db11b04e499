"""VMM processes: spawning them so they can outlive the worker, watching them, reaping them.

Every hypervisor process goes through :func:`spawn_vmm`. It starts the VMM in a session of
its own (a Ctrl-C aimed at the worker's terminal does not reach the VMs), appends its
output to ``vmm.log``, and waits for its control socket. If anything fails before the VMM
is ready, the whole process group is killed and reaped and the socket unlinked, so a
failed start never leaves an orphan; the error quotes the tail of ``vmm.log``.

A process is watched through a pidfd, which works the same for our own children and for
VMMs adopted from a previous worker process (those are no longer our children, so the init
process reaps them, not us).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

import anyio

from schemas.errors import HypervisorError

__all__ = ["VmmProcess", "find_vmms", "log_tail", "spawn_vmm"]

#: sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


class VmmProcess:
    """A running (or exited) VMM, identified by pid, watched through a pidfd."""

    def __init__(self, pid: int, *, is_child: bool) -> None:
        self.pid = pid
        self.is_child = is_child
        self._pidfd: int | None = _pidfd_open(pid)
        self.returncode: int | None = None

    @classmethod
    def adopt(cls, pid: int, *, cmdline_must_contain: str) -> VmmProcess | None:
        """Take over a VMM a previous worker started, if it still runs and is ours.

        ``cmdline_must_contain`` (the instance's socket path) guards against a recycled pid.
        """
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return None
        if cmdline_must_contain.encode() not in cmdline or _is_zombie(pid):
            return None
        return cls(pid, is_child=_is_our_child(pid))

    def running(self) -> bool:
        if self.returncode is not None:
            return False
        self._reap_nowait()
        if self.returncode is not None:
            return False
        alive = Path(f"/proc/{self.pid}").exists() and not _is_zombie(self.pid)
        if not alive:
            # It exited between the waitpid above and the look at /proc: reap it now, or
            # it stays a zombie for as long as this worker runs.
            self._reap_nowait()
        return alive

    async def wait(self) -> int | None:
        """Wait for the process to exit; return its exit status when it was our child."""
        while self.running():
            if self._pidfd is None:
                await anyio.sleep(0.05)
                continue
            await anyio.wait_readable(self._pidfd)
            self._reap_nowait()
            if not self.is_child:
                break
        self._close_pidfd()
        return self.returncode

    async def wait_for(self, timeout_s: float) -> bool:
        """True when the process exited within ``timeout_s``."""
        with anyio.move_on_after(timeout_s):
            await self.wait()
        return not self.running()

    def kill_group(self, sig: signal.Signals = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    async def kill_and_reap(self, timeout_s: float = 5.0) -> None:
        """SIGKILL the VMM's process group and wait for it, even if we are being cancelled."""
        with anyio.CancelScope(shield=True):
            self.kill_group()
            if not await self.wait_for(timeout_s):
                raise HypervisorError(f"VMM pid {self.pid} did not exit after SIGKILL")

    def _reap_nowait(self) -> None:
        if not self.is_child or self.returncode is not None:
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.is_child = False
            return
        if pid == self.pid:
            self.returncode = os.waitstatus_to_exitcode(status)

    def _close_pidfd(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self._close_pidfd()


async def spawn_vmm(
    argv: Sequence[str],
    *,
    log_path: Path,
    socket_path: Path,
    ready_timeout_s: float = 10.0,
) -> VmmProcess:
    """Start a VMM and return once its control socket accepts connections."""
    _check_socket_path(socket_path)
    _unlink_stale_socket(socket_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid = _posix_spawn(argv, log_path)
    process = VmmProcess(pid, is_child=True)
    try:
        with anyio.fail_after(ready_timeout_s):
            await _wait_for_socket(process, socket_path)
    except BaseException as exc:
        await process.kill_and_reap()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        if isinstance(exc, TimeoutError | HypervisorError):
            raise HypervisorError(
                f"{Path(argv[0]).name} did not start: {exc or 'no control socket'}; "
                f"vmm.log: {log_tail(log_path)}"
            ) from exc
        raise
    return process


def find_vmms(guests_dir: Path) -> list[int]:
    """Live VMMs of the instances under ``guests_dir``, whatever records say: every VMM gets
    its control sockets in ``<guests_dir>/<id>/run/``, so its command line names that."""
    marker = f"{guests_dir}/".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = entry.read_bytes().split(b"\0")
        except OSError:
            continue
        pid = int(entry.parent.name)
        mentions = (arg for arg in argv[1:] if marker in arg)
        if any(b"/run/" in arg.partition(marker)[2] for arg in mentions) and not _is_zombie(pid):
            found.append(pid)
    return found


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(empty)"
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail) or "(empty)"


def _posix_spawn(argv: Sequence[str], log_path: Path) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    try:
        return os.posix_spawn(
            argv[0],
            list(argv),
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(log_path), flags, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )
    except OSError as exc:
        raise HypervisorError(f"cannot start {argv[0]}: {exc.strerror}") from exc


async def _wait_for_socket(process: VmmProcess, path: Path) -> None:
    while True:
        if not process.running():
            raise HypervisorError(f"exited with status {process.returncode}")
        if path.exists() and _connectable(path):
            return
        await anyio.sleep(0.02)


def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.1)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise HypervisorError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; "
            "use a shorter VMFLEET_DATA_DIR"
        )


def _unlink_stale_socket(path: Path) -> None:
    """A socket file left by a killed VMM would make the new one fail to bind."""
    if path.exists() and not _connectable(path):
        path.unlink()


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.ENOSYS):
            return None
        raise


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def _is_our_child(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return int(stat[stat.rindex(")") + 2 :].split()[1]) == os.getpid()
