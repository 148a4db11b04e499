"""Where snapshots live on a host, and how their files are made, listed and shared.

    <data>/snapshots/<id>/
        manifest.json        SnapshotManifest, written last: its presence = complete
        vm/                  kind Standby: the saved VM as the driver wrote it + vm.json
        disks/overlay.raw    the instance's writable layer at capture
        disks/config.ext4    its config disk (the guest has it mounted)
        disks/vol-<id>.raw   overlay volumes' layers

A snapshot is made in ``.<id>.partial/`` and renamed into place once its manifest is
written, so a crash or a full disk leaves no half snapshot that looks whole; partial
directories are swept when the worker starts. Everything under a complete snapshot is
immutable: forks take hard links of its files (a snapshot deleted while forks run loses
only its own names for them) and put qcow2 layers over its disks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import anyio.to_thread
import msgspec

from schemas.errors import NotFound
from schemas.snapshots import SnapshotFile, SnapshotManifest
from worker.run import CommandFailed, run_command
from worker.storage import storage_error, write_atomic

__all__ = ["SnapshotStore", "copy_cow", "file_entries", "link_tree", "sha256_file"]

MANIFEST = "manifest.json"
VM_DIR = "vm"
DISKS_DIR = "disks"
_COPY_TIMEOUT_S = 900.0


class SnapshotStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "snapshots"

    def directory(self, snapshot_id: str) -> Path:
        return self.root / snapshot_id

    def partial(self, snapshot_id: str) -> Path:
        return self.root / f".{snapshot_id}.partial"

    def read(self, snapshot_id: str) -> SnapshotManifest | None:
        try:
            raw = (self.directory(snapshot_id) / MANIFEST).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return msgspec.json.decode(raw, type=SnapshotManifest)

    def require(self, snapshot_id: str) -> SnapshotManifest:
        manifest = self.read(snapshot_id)
        if manifest is None:
            raise NotFound(f"snapshot {snapshot_id} not found on this host")
        return manifest

    def list(self) -> list[SnapshotManifest]:
        if not self.root.is_dir():
            return []
        found = (self.read(entry.name) for entry in sorted(self.root.iterdir()))
        return [manifest for manifest in found if manifest is not None]

    def begin(self, snapshot_id: str) -> Path:
        """A fresh partial directory for a snapshot being made."""
        partial = self.partial(snapshot_id)
        shutil.rmtree(partial, ignore_errors=True)
        (partial / DISKS_DIR).mkdir(parents=True)
        return partial

    def complete(self, partial: Path, manifest: SnapshotManifest) -> None:
        """Write the manifest and move the snapshot into place."""
        write_atomic(partial / MANIFEST, msgspec.json.encode(manifest))
        partial.replace(self.directory(manifest.id))

    def remove(self, snapshot_id: str) -> None:
        """Gone at once under its name (a rename), then its files."""
        directory = self.directory(snapshot_id)
        doomed = self.root / f".{snapshot_id}.deleting"
        try:
            directory.replace(doomed)
        except FileNotFoundError:
            return
        _discard(doomed)

    def sweep_incomplete(self) -> None:
        """Drop what an interrupted snapshot or delete left behind."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not (entry / MANIFEST).exists():
                _discard(entry)


def _discard(entry: Path) -> None:
    """A snapshot's directory, or the link to a copy fetched from another host (the copy
    itself belongs to the transfers cache, which evicts it)."""
    if entry.is_symlink():
        entry.unlink(missing_ok=True)
    else:
        shutil.rmtree(entry, ignore_errors=True)


async def copy_cow(source: Path, target: Path) -> None:
    """A copy that shares blocks where the filesystem can (reflink), else a sparse copy
    (only written blocks are copied). 507 when the disk is full; nothing is left of it."""
    try:
        await run_command(
            ["cp", "--reflink=auto", "--sparse=always", str(source), str(target)],
            _COPY_TIMEOUT_S,
        )
    except CommandFailed as exc:
        target.unlink(missing_ok=True)
        raise storage_error(f"could not copy {source.name}: {exc.stderr.strip()}") from exc


def link_tree(source: Path, target: Path) -> None:
    """Hard links of every file under ``source`` at the same places under ``target``."""
    for directory, _, files in os.walk(source):
        relative = Path(directory).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            os.link(Path(directory) / name, target / relative / name)


def sha256_file(path: Path) -> str:
    """``sparse-sha256:<hex>``: sha256 over each data extent of the file as
    ``offset (8 bytes BE) + length (8 bytes BE) + bytes``, then the file's size. Holes are
    skipped, not read: a 10 GiB overlay with 50 MiB written is hashed in the time of 50
    MiB. (A hole and written zeros differ here, which a copy made with ``cp --sparse`` may
    change: the digest is of a file as stored, checked against the same file moved whole.)"""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as data:
        fd = data.fileno()
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            digest.update(start.to_bytes(8, "big") + (end - start).to_bytes(8, "big"))
            data.seek(start)
            left = end - start
            while left:
                chunk = data.read(min(left, 1 << 20))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
            offset = end
    digest.update(size.to_bytes(8, "big"))
    return "sparse-sha256:" + digest.hexdigest()


async def file_entries(directory: Path) -> tuple[SnapshotFile, ...]:
    """Every file under ``directory`` with its sizes and checksum (in a thread: the memory
    file is as big as the guest's memory)."""
    return await anyio.to_thread.run_sync(_entries, directory)


def _entries(directory: Path) -> tuple[SnapshotFile, ...]:
    entries = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        info = path.stat()
        entries.append(
            SnapshotFile(
                path=str(path.relative_to(directory)),
                size_bytes=info.st_size,
                allocated_bytes=info.st_blocks * 512,
                sha256=sha256_file(path),
            )
        )
    return tuple(entries)
