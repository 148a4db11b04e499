"""VMM processes: spawning them so they can outlive the worker, watching them, reaping them.

Every hypervisor process goes through :func:`spawn_vmm`. It starts the VMM in a session of
its own (a Ctrl-C aimed at the worker's terminal does not reach the VMs), appends its
output to ``vmm.log``, and waits for its control socket. If anything fails before the VMM
is ready, the whole process group is killed and reaped and the socket unlinked, so a
failed start never leaves an orphan; the error quotes the tail of ``vmm.log``.

A process is watched through a pidfd registered with the event loop, which works the same
for our own children and for VMMs adopted from a previous worker process (those are no
longer our children, so the init process reaps them, not us). Liveness and exit come from
the pidfd and waitid, never from a look at /proc: a multi-threaded VMM's main thread shows
as a zombie in /proc while its other threads still exit, and a wait that trusted that look
returned before the process could be reaped, leaving it a zombie for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
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
    """A running (or exited) VMM, identified by pid, watched through a pidfd.

    The pidfd is registered with the event loop when the process is taken on, so the
    moment the process exits it is reaped (our child) or noted (an adopted VMM, which the
    init process reaps), whether or not anyone is waiting for it at that moment, and
    however the rest of the worker lost track of it: no VMM ever lingers as a zombie.
    """

    def __init__(self, pid: int, *, is_child: bool) -> None:
        self.pid = pid
        self.is_child = is_child
        self.returncode: int | None = None
        self._exited = asyncio.Event()
        self._pidfd: int | None = _pidfd_open(pid)
        self._loop: asyncio.AbstractEventLoop | None = None
        if self._pidfd is None:
            self._note_exit(self._reap_gone_child())
        else:
            self._watch()

    @classmethod
    def adopt(cls, pid: int, *, cmdline_must_contain: str) -> VmmProcess | None:
        """Take over a VMM a previous worker started, if it still runs and is ours.

        ``cmdline_must_contain`` (the instance's socket path) guards against a recycled pid.
        """
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return None
        if cmdline_must_contain.encode() not in cmdline:
            return None
        process = cls(pid, is_child=_is_our_child(pid))
        return process if process.running() else None

    def running(self) -> bool:
        if self._exited.is_set():
            return False
        if self._pidfd is not None and _readable(self._pidfd):
            self._on_exit()  # the loop has not run its callback yet
        return not self._exited.is_set()

    async def wait(self) -> int | None:
        """Wait for the process to exit; return its exit status when it was our child."""
        if self.running():
            await self._exited.wait()
        return self.returncode

    async def wait_for(self, timeout_s: float) -> bool:
        """True when the process exited within ``timeout_s``."""
        with anyio.move_on_after(timeout_s):
            await self.wait()
        return not self.running()

    def kill_group(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if not self.running():
            return  # its pid (and group id) may belong to another process by now
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

    def _watch(self) -> None:
        """Have the event loop call :meth:`_on_exit` once the pidfd turns readable (the
        whole process has exited). The loop holds this object until then."""
        assert self._pidfd is not None
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): running() looks at the pidfd itself
        self._loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        fd = self._pidfd
        if fd is None:
            return
        status: int | None = None
        if self.is_child:
            try:
                info = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                info = None  # reaped by someone else: no status to report
            else:
                if info is None:
                    return  # not reapable yet (cannot happen once readable): next time
            status = _exit_status(info)
        self._stop_watching()
        self._note_exit(status)

    def _note_exit(self, status: int | None) -> None:
        self.returncode = status
        self._exited.set()

    def _reap_gone_child(self) -> int | None:
        """No pidfd could be opened: the pid is gone, or (if ours) already reaped."""
        if not self.is_child:
            return None
        with contextlib.suppress(ChildProcessError):
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG)
            return _exit_status(info) if info is not None else None
        return None

    def _stop_watching(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)
        os.close(fd)

    def __del__(self) -> None:
        fd, self._pidfd = getattr(self, "_pidfd", None), None
        if fd is not None:
            os.close(fd)


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
        # Short: a restore waits here on a wake's path (a check costs a stat and a connect).
        await anyio.sleep(0.002)


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
        if exc.errno == errno.ESRCH:
            return None
        raise


def _readable(fd: int) -> bool:
    """A pidfd is readable once its process has exited."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _exit_status(info: os.waitid_result | None) -> int | None:
    """As subprocess reports it: the exit code, or minus the signal that killed it."""
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def _is_our_child(pid: int) -> bool:
    """Whether ``pid`` is this process's child (asked of the kernel, reaping nothing)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True
