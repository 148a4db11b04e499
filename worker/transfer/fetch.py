"""Fetching a bundle into a directory, resumably, and proving every byte before use.

The fetch writes into a partial directory that only the caller renames into place, and
only after every file hashed to the manifest's SHA-256: a broken or corrupt fetch never
leaves anything that looks complete. A fetch that finds a partial directory of the same
manifest resumes it: a part whose bytes on disk already hash to the manifest's value is
kept, every other part is fetched again. A partial of another manifest is thrown away.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from nats.js.errors import DigestMismatchError, NotFoundError
from nats.js.object_store import ObjectStore

from schemas.transfers import TransferFile, TransferManifest, encode_manifest
from worker.transfer._groups import parts_group
from worker.transfer.errors import BundleNotFound, CorruptTransfer
from worker.transfer.names import part_object
from worker.transfer.upload import DEFAULT_PARALLEL

__all__ = ["FetchStats", "fetch_into"]

#: The manifest a partial directory was started from (compared on resume).
PARTIAL_MANIFEST = ".transfer-manifest.json"
_HASH_BLOCK = 4 << 20


@dataclass(frozen=True)
class FetchStats:
    bytes_fetched: int
    parts_fetched: int
    #: Parts found already complete in the partial directory (a resumed fetch).
    parts_kept: int
    seconds: float


def _hash_range(path: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        while length > 0:
            block = f.read(min(length, _HASH_BLOCK))
            if not block:
                break
            h.update(block)
            length -= len(block)
    return h.hexdigest()


class _PartWriter:
    """Where the store writes one part's chunks as they come (nats-py calls ``write`` in
    a thread): straight into its place in the file, hashed on the way. No part is ever
    held whole in memory."""

    def __init__(self, path: Path, offset: int) -> None:
        self.fd = os.open(path, os.O_WRONLY)
        self.offset = offset
        self.written = 0
        self.sha256 = hashlib.sha256()

    def write(self, chunk: bytes) -> int:
        self.sha256.update(chunk)
        os.pwrite(self.fd, chunk, self.offset + self.written)
        self.written += len(chunk)
        return len(chunk)

    def __enter__(self) -> _PartWriter:
        return self

    def __exit__(self, *_: object) -> None:
        os.close(self.fd)


def _prepare(partial: Path, manifest: TransferManifest) -> bool:
    """Make ``partial`` ready for ``manifest``; True when it holds an earlier attempt at the
    same manifest (so parts on disk may be kept)."""
    wanted = encode_manifest(manifest)
    marker = partial / PARTIAL_MANIFEST
    resuming = marker.is_file() and marker.read_bytes() == wanted
    if not resuming and partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    marker.write_bytes(wanted)
    for f in manifest.files:
        path = _target(partial, f)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as handle:
            handle.truncate(f.size)
    return resuming


def _target(partial: Path, f: TransferFile) -> Path:
    path = (partial / f.path).resolve()
    if not path.is_relative_to(partial.resolve()) or f.path.startswith("."):
        raise CorruptTransfer(f"manifest names a path outside its bundle: {f.path!r}")
    return path


def _verify_file(path: Path, f: TransferFile) -> None:
    """Hash the whole file (and flush it to disk, so a rename after this is durable)."""
    if path.stat().st_size != f.size or _hash_range(path, 0, f.size) != f.sha256:
        raise CorruptTransfer(f"{f.path}: SHA-256 does not match the manifest")
    os.chmod(path, f.mode)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Fetcher:
    def __init__(
        self,
        store: ObjectStore,
        manifest: TransferManifest,
        partial: Path,
        parallel: int,
        on_part: Callable[[int], None] | None,
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.partial = partial
        self.slots = anyio.Semaphore(parallel)
        self.on_part = on_part
        self.fetched = 0
        self.parts = 0
        self.kept = 0

    async def part(self, file_index: int, part_index: int, resuming: bool) -> None:
        f = self.manifest.files[file_index]
        path = _target(self.partial, f)
        offset = part_index * self.manifest.part_bytes
        length = min(self.manifest.part_bytes, f.size - offset)
        expected = f.parts[part_index]
        async with self.slots:
            if (
                resuming
                and await anyio.to_thread.run_sync(_hash_range, path, offset, length) == expected
            ):
                self.kept += 1
                return
            name = part_object(self.manifest.bundle, file_index, part_index)
            with _PartWriter(path, offset) as writer:
                try:
                    await self.store.get(name, writeinto=writer)  # type: ignore[arg-type]
                except DigestMismatchError as exc:
                    raise CorruptTransfer(
                        f"{name}: the store's chunks do not match its digest"
                    ) from exc
                except NotFoundError as exc:
                    raise BundleNotFound(self.manifest.bundle) from exc
            if writer.written != length or writer.sha256.hexdigest() != expected:
                raise CorruptTransfer(
                    f"{f.path} part {part_index}: SHA-256 does not match the manifest"
                )
            self.fetched += writer.written
            self.parts += 1
            if self.on_part is not None:
                self.on_part(self.parts)


async def fetch_into(
    store: ObjectStore,
    manifest: TransferManifest,
    partial: Path,
    *,
    parallel: int = DEFAULT_PARALLEL,
    on_part: Callable[[int], None] | None = None,
) -> FetchStats:
    """Fetch ``manifest``'s bundle into ``partial`` and verify every file. On success
    ``partial`` holds exactly the bundle's files (the caller renames it into place). On
    CorruptTransfer it is removed (the next fetch starts over); on any other failure
    (a broken connection, a cancelled fetch) it stays for the next fetch to resume."""
    started = time.monotonic()
    resuming = await anyio.to_thread.run_sync(_prepare, partial, manifest)
    fetcher = _Fetcher(store, manifest, partial, parallel, on_part)
    try:
        async with parts_group() as tg:
            for file_index, f in enumerate(manifest.files):
                zeros = set(f.zero_parts)
                for part_index in range(len(f.parts)):
                    if part_index not in zeros:
                        tg.start_soon(fetcher.part, file_index, part_index, resuming)
        for f in manifest.files:
            await anyio.to_thread.run_sync(_verify_file, _target(partial, f), f)
    except CorruptTransfer:
        await anyio.to_thread.run_sync(shutil.rmtree, partial, True)
        raise
    (partial / PARTIAL_MANIFEST).unlink()
    return FetchStats(fetcher.fetched, fetcher.parts, fetcher.kept, time.monotonic() - started)
