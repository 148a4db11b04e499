"""What a bundle of files in transit between hosts looks like in the transfers object store.

A bundle is one directory (a snapshot, or a Standby instance on its way to another host)
cut into parts. Each part is one object of the store; the manifest, written last, lists
every file with its SHA-256 and the SHA-256 of each of its parts. A bundle without its
manifest is an upload still running (or broken off): nobody fetches it.

The object names are ``<bundle>/manifest`` and ``<bundle>/part/<file index>/<part index>``;
``worker.transfer`` builds them, ``Subjects.transfers_bucket`` names the store.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

__all__ = [
    "TransferFile",
    "TransferManifest",
    "decode_manifest",
    "encode_manifest",
    "snapshot_bundle",
    "volumes_attached",
]


def volumes_attached(instance_id: str, volume_ids: list[str], host: str) -> str:
    """Why an instance with volumes does not move (the gateway refuses it before placing
    it, the worker again before sending anything)."""
    return (
        f"instance {instance_id} has volumes attached ({', '.join(volume_ids)}): volumes are "
        f"files on host {host} and do not move; detach them first"
    )


def snapshot_bundle(snapshot_id: str) -> str:
    """The bundle a snapshot travels as: one per snapshot, every host fetches the same."""
    return f"snap-{snapshot_id}"


class TransferFile(msgspec.Struct, frozen=True, kw_only=True):
    """One regular file of a bundle: its path relative to the bundle's directory."""

    path: str
    size: int
    mode: int = 0o644
    #: Hex SHA-256 of the whole file: checked before the file is used.
    sha256: str
    #: Hex SHA-256 of each part, in order; the store's own digest is checked too.
    parts: list[str] = msgspec.field(default_factory=list)
    #: Indexes of parts that are all zeros: not uploaded, left as holes (sparse files).
    zero_parts: list[int] = msgspec.field(default_factory=list)


class TransferManifest(msgspec.Struct, frozen=True, kw_only=True):
    """The last object of a bundle: what a complete copy holds."""

    bundle: str
    part_bytes: int
    files: list[TransferFile]
    created_at: datetime

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(TransferManifest)


def encode_manifest(manifest: TransferManifest) -> bytes:
    return _ENCODER.encode(manifest)


def decode_manifest(data: bytes) -> TransferManifest:
    """Raises ``msgspec.DecodeError`` (or its subclass ValidationError) on a bad manifest."""
    return _DECODER.decode(data)
