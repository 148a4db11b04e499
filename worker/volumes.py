"""Volumes on this host: sparse ext4 files, their records, and who has them attached.

    <data>/volumes/<id>/data.raw       the volume (ext4)
    <data>/volumes/<id>/metadata.json  schemas.messages.VolumeRecord

Attachment rules are hypeman's: a volume attached read-write is attached nowhere else;
one attached read-only may be attached read-only to more instances; an instance attaches
a volume once.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import anyio
import msgspec

from schemas.api import VolumeAttachment
from schemas.clock import utc_now
from schemas.codec import decode_volume_record
from schemas.errors import BadRequest, Conflict, NotFound
from schemas.messages import VolumeRecord
from worker.storage import make_ext4_from_tree, make_sparse_ext4, write_atomic

__all__ = ["VolumeStore"]

GIB = 1 << 30
_encoder = msgspec.json.Encoder()


class VolumeStore:
    def __init__(
        self,
        data_dir: Path,
        host_id: str,
        on_change: Callable[[str, VolumeRecord | None], None] = lambda volume_id, record: None,
    ) -> None:
        self.root = data_dir / "volumes"
        self.host_id = host_id
        #: Told of every change (None: the volume is gone), to publish the record.
        self.on_change = on_change

    def data_path(self, volume_id: str) -> Path:
        return self.root / volume_id / "data.raw"

    def get(self, volume_id: str) -> VolumeRecord | None:
        try:
            raw = (self.root / volume_id / "metadata.json").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return decode_volume_record(raw)

    def require(self, volume_id: str) -> VolumeRecord:
        record = self.get(volume_id)
        if record is None:
            raise NotFound(f"volume {volume_id} not found")
        return record

    def list(self) -> list[VolumeRecord]:
        if not self.root.is_dir():
            return []
        found = (self.get(entry.name) for entry in sorted(self.root.iterdir()))
        return [record for record in found if record is not None]

    async def create(self, volume_id: str, name: str, size_gb: int) -> VolumeRecord:
        """An empty ext4 volume; the record is written last, so a crash leaves no record
        pointing at a half-made disk."""
        directory = self.root / volume_id
        try:
            directory.mkdir(parents=True)
        except FileExistsError:
            raise Conflict("volume with this ID already exists", code="already_exists") from None
        try:
            await make_sparse_ext4(directory / "data.raw", size_gb * GIB, label=name)
            record = VolumeRecord(
                id=volume_id,
                name=name,
                size_gb=size_gb,
                host=self.host_id,
                created_at=utc_now(),
            )
            self._save(record)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return record

    async def create_from_archive(
        self,
        volume_id: str,
        name: str,
        size_gb: int,
        archive: Path,
        *,
        content_limit: int | None = None,
    ) -> VolumeRecord:
        """A volume holding a tar.gz's content, with hypeman's rules: at most ``size_gb`` GiB
        of content; no absolute paths, ``..`` or links leading out; the disk is sized to the
        content (x1.5, at least 10 MiB) and ``size_gb`` reports its size, rounded up."""
        directory = self.root / volume_id
        try:
            directory.mkdir(parents=True)
        except FileExistsError:
            raise Conflict("volume with this ID already exists", code="already_exists") from None
        try:
            with tempfile.TemporaryDirectory(dir=self.root, prefix=".extract-") as tree:
                content = await anyio.to_thread.run_sync(
                    _extract_archive, archive, Path(tree), content_limit or size_gb * GIB
                )
                disk_bytes = max(10 << 20, -(-int(content * 1.5) // (1 << 20)) * (1 << 20))
                await make_ext4_from_tree(Path(tree), directory / "data.raw", disk_bytes)
            record = VolumeRecord(
                id=volume_id,
                name=name,
                size_gb=max(1, -(-disk_bytes // GIB)),
                host=self.host_id,
                created_at=utc_now(),
            )
            self._save(record)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return record

    def delete(self, volume_id: str) -> None:
        record = self.require(volume_id)
        if record.attachments:
            raise Conflict("volume is in use by an instance")
        shutil.rmtree(self.root / volume_id)
        self.on_change(volume_id, None)

    def attach(
        self, volume_id: str, instance_id: str, mount_path: str, readonly: bool
    ) -> VolumeRecord:
        record = self.require(volume_id)
        _check_can_attach(record, instance_id, readonly)
        attachment = VolumeAttachment(
            instance_id=instance_id, mount_path=mount_path, readonly=readonly
        )
        record = msgspec.structs.replace(record, attachments=[*record.attachments, attachment])
        self._save(record)
        return record

    def detach(self, volume_id: str, instance_id: str) -> VolumeRecord | None:
        record = self.get(volume_id)
        if record is None:
            return None
        remaining = [a for a in record.attachments if a.instance_id != instance_id]
        record = msgspec.structs.replace(record, attachments=remaining)
        self._save(record)
        return record

    def _save(self, record: VolumeRecord) -> None:
        write_atomic(self.root / record.id / "metadata.json", _encoder.encode(record))
        self.on_change(record.id, record)


def _extract_archive(archive: Path, into: Path, limit: int) -> int:
    """Extract safely; return the content's size. Refuses what could escape ``into``."""
    total = 0
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar:
                if member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise BadRequest(
                        f"archive entry {member.name!r} leaves the volume", code="invalid_archive"
                    )
                total += max(member.size, 0)
                if total > limit:
                    raise BadRequest(
                        f"archive content exceeds the volume size ({limit} bytes)",
                        code="archive_too_large",
                    )
                tar.extract(member, into, filter="data")
    except tarfile.FilterError as exc:
        raise BadRequest(f"unsafe archive entry: {exc}", code="invalid_archive") from None
    # KeyError: a hard link to a member the archive does not hold.
    except (tarfile.TarError, EOFError, OSError, KeyError) as exc:
        raise BadRequest(f"not a valid tar.gz archive: {exc}", code="invalid_archive") from None
    return total


def _check_can_attach(record: VolumeRecord, instance_id: str, readonly: bool) -> None:
    if any(a.instance_id == instance_id for a in record.attachments):
        raise Conflict(f"volume {record.id} is already attached to this instance")
    if any(not a.readonly for a in record.attachments):
        raise Conflict(f"volume {record.id} is attached read-write to another instance")
    if record.attachments and not readonly:
        raise Conflict(f"volume {record.id} is attached read-only elsewhere; attach it read-only")
