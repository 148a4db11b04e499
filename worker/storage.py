"""Where an instance lives on disk: one directory that holds all of it.

    <data>/guests/<id>/
        metadata.json        the instance record as this host knows it (survives restarts)
        vm.json              the VMM device model currently in effect (worker.drivers.VmSpec)
        vmm.pid              pid of the running VMM, for adoption by the next worker
        command              id of the command under way (a worker that dies in it leaves it)
        overlay.raw          sparse ext4: the writable layer over the image
        config.ext4          read-only: the app's command, env, mounts
        vol-overlays/<vol>.raw
        run/                 sockets (QMP, guest control channel)
        logs/app.log vmm.log ops.log
        snapshots/snapshot-latest/   memory + vm.json while in standby

Deleting an instance removes exactly this directory, so nothing of it can be left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import msgspec

from schemas.errors import InsufficientStorage, VmfleetError
from worker.run import CommandFailed, run_command

__all__ = [
    "GuestDir",
    "Storage",
    "disk_full",
    "make_sparse_ext4",
    "storage_error",
    "write_atomic",
]

#: Bound of one mkfs.ext4: writing a volume from a large archive is the slowest.
_MKFS_TIMEOUT_S = 900.0

#: How the tools (mkfs, skopeo, umoci) say the host's disk is full.
_DISK_FULL_MARKERS = ("no space left on device", "disk quota exceeded")

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def disk_full(message: str) -> bool:
    return any(marker in message.lower() for marker in _DISK_FULL_MARKERS)


def storage_error(message: str) -> VmfleetError:
    """A failure to write on this host: 507 when the disk is full, else 500."""
    return InsufficientStorage(message) if disk_full(message) else VmfleetError(message)


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write-then-rename, fsynced: a crash leaves the old file or the new one, never half.

    ``durable=False`` skips the fsync, for hints that only a worker's crash must survive
    (the page cache does) and that cost nothing worse than redoing a check when a power
    loss drops them: an fsync per command is milliseconds on a busy disk.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        if durable:
            out.flush()
            os.fsync(out.fileno())
    tmp.replace(path)


@dataclass(frozen=True)
class GuestDir:
    root: Path

    @property
    def id(self) -> str:
        return self.root.name

    @property
    def metadata(self) -> Path:
        return self.root / "metadata.json"

    @property
    def vm_spec(self) -> Path:
        return self.root / "vm.json"

    @property
    def pid_file(self) -> Path:
        return self.root / "vmm.pid"

    @property
    def overlay(self) -> Path:
        return self.root / "overlay.raw"

    @property
    def config_disk(self) -> Path:
        return self.root / "config.ext4"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def app_log(self) -> Path:
        return self.root / "logs" / "app.log"

    @property
    def vmm_log(self) -> Path:
        return self.root / "logs" / "vmm.log"

    @property
    def ops_log(self) -> Path:
        return self.root / "logs" / "ops.log"

    @property
    def snapshot(self) -> Path:
        return self.root / "snapshots" / "snapshot-latest"

    def volume_overlay(self, volume_id: str) -> Path:
        return self.root / "vol-overlays" / f"{volume_id}.raw"

    def has_snapshot(self) -> bool:
        return self.snapshot.is_dir() and any(self.snapshot.iterdir())

    def read(self, path: Path, type_: type[T]) -> T:
        return msgspec.json.decode(path.read_bytes(), type=type_)

    def write(self, path: Path, value: object) -> None:
        write_atomic(path, _encoder.encode(value))

    def read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def mark_command(self, command_id: str | None) -> None:
        """Note the command under way (None: it ended). Best effort: a full disk must not
        stop a command, it only costs the next worker this hint."""
        path = self.root / "command"
        try:
            if command_id is None:
                path.unlink(missing_ok=True)
            else:
                # Not fsynced: a hint for the worker after a crash of this one.
                write_atomic(path, command_id.encode(), durable=False)
        except OSError:
            pass

    def read_command(self) -> str | None:
        try:
            return (self.root / "command").read_text() or None
        except OSError:
            return None

    def write_pid(self, pid: int | None) -> None:
        """Record the running VMM's pid; None: the VMM is gone, and so are its sockets
        (a VMM that was killed leaves them behind, and a stale socket reads as a live VM)."""
        if pid is None:
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()
            self._remove_sockets()
        else:
            write_atomic(self.pid_file, str(pid).encode())

    def _remove_sockets(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            for entry in self.run_dir.iterdir():
                if entry.is_socket():
                    entry.unlink(missing_ok=True)


class Storage:
    """The per-host data directory's guest area."""

    def __init__(self, data_dir: Path) -> None:
        self.guests = data_dir / "guests"

    def guest(self, instance_id: str) -> GuestDir:
        return GuestDir(self.guests / instance_id)

    def create_guest(self, instance_id: str) -> GuestDir:
        guest = self.guest(instance_id)
        guest.root.mkdir(parents=True)
        for sub in (guest.run_dir, guest.logs):
            sub.mkdir()
        return guest

    def existing(self) -> Iterator[GuestDir]:
        if not self.guests.is_dir():
            return
        for entry in sorted(self.guests.iterdir()):
            if entry.is_dir() and (entry / "metadata.json").exists():
                yield GuestDir(entry)

    def remove_guest(self, instance_id: str) -> None:
        shutil.rmtree(self.guest(instance_id).root, ignore_errors=True)


async def make_ext4_from_tree(tree: Path, path: Path, size_bytes: int) -> None:
    """An ext4 image of ``tree`` (mkfs.ext4 -d needs no mount, and no root)."""
    tmp = path.with_name(f".{path.name}.tmp")
    argv = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "^has_journal", "-d", str(tree)]
    await _mkfs([*argv, str(tmp), f"{size_bytes // 1024}k"], tmp, path)


async def make_sparse_ext4(
    path: Path, size_bytes: int, *, label: str = "", dirs: Mapping[str, int] | None = None
) -> None:
    """A sparse file formatted ext4 at ``size_bytes``: takes no space until written.

    ``dirs``: empty directories (path: mode) made in it, owned by root, when this process
    is root (a directory of another owner would lend it to what the guest mounts there);
    else left for the guest to make.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as out:
        out.truncate(size_bytes)
    argv = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"]
    if label:
        argv += ["-L", label[:16]]
    with _root_tree(path.parent, dirs if dirs and os.geteuid() == 0 else {}) as tree:
        if tree is not None:
            argv += ["-d", str(tree)]
        await _mkfs([*argv, str(tmp)], tmp, path)


@contextlib.contextmanager
def _root_tree(parent: Path, dirs: Mapping[str, int]) -> Iterator[Path | None]:
    """A staging tree of ``dirs`` for mkfs.ext4 -d (None: no dirs), removed after."""
    if not dirs:
        yield None
        return
    tree = Path(tempfile.mkdtemp(prefix=".tree-", dir=parent))
    try:
        for name, mode in dirs.items():
            (tree / name).mkdir(parents=True)
            (tree / name).chmod(mode)
        yield tree
    finally:
        shutil.rmtree(tree, ignore_errors=True)


async def _mkfs(argv: list[str], tmp: Path, path: Path) -> None:
    """Format ``tmp``, then rename it to ``path``; on failure nothing is left behind."""
    try:
        await run_command(argv, _MKFS_TIMEOUT_S)
    except CommandFailed as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(f"mkfs.ext4 failed for {path.name}: {exc.stderr.strip()}") from exc
    tmp.replace(path)
