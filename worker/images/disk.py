"""Disk building: an unpacked image tree becomes a read-only ext4 disk and its metadata.

``disks/<digest hex>/`` holds one image per platform manifest digest::

    rootfs.ext4     the image's filesystem (sparse; attached read-only as vda)
    metadata.json   name, digest, size, entrypoint, cmd, env, working dir

``umoci unpack`` (``--rootless`` unless root; as root, file owners are kept) makes the tree,
``mkfs.ext4 -d`` writes it into a temporary file that is renamed to ``rootfs.ext4``, and
``metadata.json`` is written last: its presence means the disk is complete. A directory
without it is swept away when the cache starts.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import anyio.to_thread
import msgspec

from schemas.clock import utc_now
from schemas.references import ImageRef
from worker.images.base import Runner, digest_hex, remove_tree
from worker.storage import write_atomic

__all__ = ["DiskStore", "ImageInfo", "make_disk", "unpack"]

_MIB: Final = 1 << 20
_BLOCK: Final = 4096
_INODE_BYTES: Final = 256


class _Metadata(msgspec.Struct, frozen=True, kw_only=True):
    """``metadata.json``: everything but the disk's location, so the cache can be moved."""

    name: str
    digest: str
    size_bytes: int
    entrypoint: list[str] = []
    cmd: list[str] = []
    env: dict[str, str] = {}
    working_dir: str | None = None
    created_at: datetime


class ImageInfo(_Metadata, frozen=True, kw_only=True):
    """A ready image on this host. Empty entrypoint/cmd/env mean the config has none."""

    disk: Path

    @property
    def has_command(self) -> bool:
        """Whether the image says what to run (CREATE refuses an image without it)."""
        return bool(self.entrypoint or self.cmd)


class DiskStore:
    """``disks/``: one directory per digest, complete once its metadata is written."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def directory(self, digest: str) -> Path:
        return self.root / digest_hex(digest)

    def read(self, digest: str) -> ImageInfo | None:
        """The ready image of ``digest``, or None if there is none (or it is incomplete)."""
        directory = self.directory(digest)
        try:
            raw = (directory / "metadata.json").read_bytes()
        except FileNotFoundError:
            return None
        return _info(msgspec.json.decode(raw, type=_Metadata), directory / "rootfs.ext4")

    def ready(self) -> list[ImageInfo]:
        """Every ready image, oldest first."""
        found = (self.read(f"sha256:{d.name}") for d in sorted(self.root.iterdir()))
        return sorted((info for info in found if info), key=lambda info: info.created_at)

    def complete(
        self, ref: ImageRef, digest: str, disk: Path, image_config: dict[str, Any]
    ) -> ImageInfo:
        """Write the metadata that marks the disk of ``digest`` complete."""
        meta = _metadata(ref, digest, disk.stat().st_size, image_config)
        write_atomic(self.directory(digest) / "metadata.json", msgspec.json.encode(meta))
        return _info(meta, disk)

    def sweep_incomplete(self) -> None:
        """Drop what an interrupted pull left (no metadata = not ready)."""
        for disk_dir in self.root.iterdir():
            if not (disk_dir / "metadata.json").exists():
                shutil.rmtree(disk_dir, ignore_errors=True)

    async def remove(self, digest: str) -> None:
        await remove_tree(self.directory(digest))


async def unpack(run: Runner, layout: Path, tag: str, bundle: Path, timeout_s: float) -> None:
    """The image tagged ``tag`` in ``layout`` as a tree under ``bundle/rootfs``."""
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    argv = ["umoci", "unpack", *rootless, "--image", f"{layout}:{tag}", str(bundle)]
    await run(argv, timeout_s)


async def make_disk(run: Runner, tree: Path, disk: Path, timeout_s: float) -> None:
    """``mkfs.ext4 -d`` into a temporary file, renamed into place when complete."""
    size, inodes = await anyio.to_thread.run_sync(_disk_geometry, tree)
    partial = disk.with_name(f".{disk.name}.partial")
    argv = [
        *("mkfs.ext4", "-q", "-F", "-b", str(_BLOCK), "-O", "^has_journal"),
        *("-m", "0", "-N", str(inodes), "-d", str(tree)),
        *(str(partial), f"{size // 1024}k"),
    ]
    try:
        await run(argv, timeout_s)
        partial.replace(disk)
    finally:
        partial.unlink(missing_ok=True)


def _metadata(ref: ImageRef, digest: str, size: int, image_config: dict[str, Any]) -> _Metadata:
    """entrypoint, cmd, env (split at the first ``=``) and working dir from the config."""
    config = image_config.get("config") or {}
    env = {
        key: value for key, _, value in (item.partition("=") for item in config.get("Env") or [])
    }
    return _Metadata(
        name=ref.name,
        digest=digest,
        size_bytes=size,
        entrypoint=list(config.get("Entrypoint") or []),
        cmd=list(config.get("Cmd") or []),
        env=env,
        working_dir=config.get("WorkingDir") or None,
        created_at=utc_now(),
    )


def _info(meta: _Metadata, disk: Path) -> ImageInfo:
    return ImageInfo(**msgspec.structs.asdict(meta), disk=disk)


def _disk_geometry(tree: Path) -> tuple[int, int]:
    """(disk bytes, inode count) for a tree: hypeman's content x 1.5, at least 10 MiB.

    Content counts whole 4 KiB blocks per file and directory plus an inode per entry, so
    trees of many small files still fit; the inode count is set from the tree too.
    """
    content, entries, seen = 0, 1, set()
    for directory, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            info = os.lstat(os.path.join(directory, name))
            entries += 1
            if info.st_ino in seen:
                continue
            seen.add(info.st_ino)
            if not _is_fast_symlink(info):
                content += -(-info.st_size // _BLOCK) * _BLOCK
    content += entries * _INODE_BYTES + _BLOCK
    size = max(10 * _MIB, -(-(content * 3 // 2) // _MIB) * _MIB)
    return size, entries + entries // 8 + 64


def _is_fast_symlink(info: os.stat_result) -> bool:
    """Symlinks of up to 59 bytes live inside the inode and take no block."""
    return (info.st_mode & 0o170000) == 0o120000 and info.st_size < 60
