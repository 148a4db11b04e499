"""Putting a directory into the transfers store as a bundle of checksummed parts.

Each file is read once, in order, part by part: the part's SHA-256 names what the fetching
host must get, the running file hash what the whole file must be. A few parts are in
flight at once, because the object store acknowledges every chunk and one part at a time
would leave the link idle between acks. A part already in the store with the same
digest (an upload broken off and started again) is not sent again. The manifest goes
last: until it is there, no host fetches the bundle.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import anyio
from nats.js.api import ObjectMeta, ObjectMetaOptions
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from schemas.clock import utc_now
from schemas.transfers import TransferFile, TransferManifest, decode_manifest, encode_manifest
from worker.transfer._groups import parts_group
from worker.transfer.names import check_bundle, manifest_object, part_object

__all__ = [
    "DEFAULT_PART_BYTES",
    "UploadStats",
    "object_digest",
    "read_manifest",
    "upload_bundle",
]

#: One part, one object: the unit a broken transfer resumes from.
DEFAULT_PART_BYTES = 8 << 20
#: Parts sent (or fetched) at once.
DEFAULT_PARALLEL = 4
#: The object store's chunk (one NATS message); under NATS's default 1 MiB max payload.
CHUNK_BYTES = 512 << 10


@dataclass(frozen=True)
class UploadStats:
    manifest: TransferManifest
    bytes_sent: int
    #: Parts already in the store (a resumed upload) or all zeros: not sent.
    parts_skipped: int
    seconds: float


def object_digest(data: bytes) -> str:
    """The object store's digest of ``data`` (``SHA-256=<urlsafe base64>``)."""
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


async def read_manifest(store: ObjectStore, bundle: str) -> TransferManifest | None:
    """The bundle's manifest, or None while it is not (completely) uploaded."""
    try:
        result = await store.get(manifest_object(bundle))
    except NotFoundError:
        return None
    return decode_manifest(result.data or b"")


def _regular_files(directory: Path, exclude: frozenset[str]) -> list[Path]:
    """Every regular file below ``directory`` but those under the top-level names in
    ``exclude``, in a stable order; anything else (a socket of a running VMM, a symlink
    out of the tree) is refused rather than silently left out."""
    found: list[Path] = []
    for path in sorted(directory.rglob("*")):
        if path.relative_to(directory).parts[0] in exclude:
            continue
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            raise ValueError(f"{path} is not a regular file: a bundle holds files only")
        if path.is_file():
            found.append(path)
    return found


def _read_part(f: BinaryIO, size: int, whole: Any) -> tuple[bytes, bool]:
    """The next part, fed to the file's hash; and whether it is all zeros. In a thread:
    hashlib lets go of the GIL, so this runs beside the sends."""
    data = f.read(size)
    whole.update(data)
    return data, data.count(0) == len(data)


def _hex_of(digest: str) -> str:
    """The hex SHA-256 of an object store digest (``SHA-256=<urlsafe base64>``)."""
    return base64.urlsafe_b64decode(digest.split("=", 1)[1]).hex()


class _Uploader:
    def __init__(
        self,
        store: ObjectStore,
        bundle: str,
        part_bytes: int,
        parallel: int,
        on_part: Callable[[int], None] | None,
    ) -> None:
        self.store = store
        self.bundle = bundle
        self.part_bytes = part_bytes
        self.slots = anyio.Semaphore(parallel)
        self.on_part = on_part
        self.sent = 0
        self.skipped = 0
        self.done = 0
        #: Looking for parts an earlier, broken upload left; off at the first one missing.
        self.resuming = True

    async def file(
        self, tg: anyio.abc.TaskGroup, index: int, name: str, path: Path
    ) -> TransferFile:
        whole = hashlib.sha256()
        size = path.stat().st_size
        count = (size + self.part_bytes - 1) // self.part_bytes
        # Filled in as the sends finish: the store hashes each part as it sends it.
        parts = [""] * count
        zero_parts: list[int] = []
        with path.open("rb") as f:
            for part_index in range(count):
                data, zero = await anyio.to_thread.run_sync(_read_part, f, self.part_bytes, whole)
                if zero:
                    parts[part_index] = _zero_digest(len(data))
                    zero_parts.append(part_index)
                    self.skipped += 1
                    continue
                await self.slots.acquire()
                part_name = part_object(self.bundle, index, part_index)
                tg.start_soon(self._send, part_name, data, parts, part_index)
        # ``parts`` is complete once the sends are: the caller builds the manifest after
        # the task group, so this record is only read then.
        return TransferFile(
            path=name,
            size=size,
            mode=path.stat().st_mode & 0o777,
            sha256=whole.hexdigest(),
            parts=parts,
            zero_parts=zero_parts,
        )

    async def _send(self, name: str, data: bytes, parts: list[str], part_index: int) -> None:
        try:
            digest = await self._already_there(name, data)
            if digest is not None:
                self.skipped += 1
            else:
                meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=CHUNK_BYTES))
                digest = (await self.store.put(name, data, meta=meta)).digest or ""
                self.sent += len(data)
            parts[part_index] = _hex_of(digest)
            self.done += 1
            if self.on_part is not None:
                self.on_part(self.done)
        finally:
            self.slots.release()

    async def _already_there(self, name: str, data: bytes) -> str | None:
        """The digest of the stored part if an earlier upload sent these very bytes."""
        if not self.resuming:
            return None
        try:
            info = await self.store.get_info(name)
        except NotFoundError:
            self.resuming = False
            return None
        digest = await anyio.to_thread.run_sync(object_digest, data)
        return digest if info.size == len(data) and info.digest == digest else None


@functools.cache
def _zero_digest(size: int) -> str:
    return hashlib.sha256(bytes(size)).hexdigest()


async def upload_bundle(
    store: ObjectStore,
    bundle: str,
    directory: Path,
    *,
    part_bytes: int = DEFAULT_PART_BYTES,
    parallel: int = DEFAULT_PARALLEL,
    on_part: Callable[[int], None] | None = None,
    exclude: frozenset[str] = frozenset(),
    extra: Mapping[str, Path] | None = None,
) -> UploadStats:
    """Upload ``directory`` as ``bundle``; a bundle already complete is left as it is
    (bundles are immutable: a snapshot is published once, fetched by many hosts).
    ``on_part`` is called with the count of parts done so far (progress; tests break
    an upload off with it). ``extra``: files from elsewhere, by the path they get in the
    bundle (the image disk a saved VM was running on)."""
    check_bundle(bundle)
    extra = extra or {}
    started = time.monotonic()
    existing = await read_manifest(store, bundle)
    if existing is not None:
        return UploadStats(existing, 0, 0, 0.0)
    uploader = _Uploader(store, bundle, part_bytes, parallel, on_part)
    files: list[TransferFile] = []
    async with parts_group() as tg:
        found = [
            (p.relative_to(directory).as_posix(), p) for p in _regular_files(directory, exclude)
        ]
        for index, (name, path) in enumerate([*found, *sorted(extra.items())]):
            files.append(await uploader.file(tg, index, name, path))
    manifest = TransferManifest(
        bundle=bundle, part_bytes=part_bytes, files=files, created_at=utc_now()
    )
    await store.put(manifest_object(bundle), encode_manifest(manifest))
    return UploadStats(manifest, uploader.sent, uploader.skipped, time.monotonic() - started)
