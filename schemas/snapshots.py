"""Snapshots and forks: hypeman 0.28's wire shapes, and what vmfleet records of a snapshot.

A snapshot is a saved instance (kind ``Standby``: memory + disks; ``Stopped``: disks only)
kept as an object of its own on the host that took it, under
``<data>/snapshots/<id>/`` (``worker.snapshots.store``). Its :class:`SnapshotManifest` says
what it needs to be restored anywhere (image, kernel and initrd identity, VMM kind and
version, devices, sizes, every file with its checksum); its :class:`SnapshotRecord` (the
manifest plus the hosts holding a copy) is the KV value of bucket ``<p>_snapshots``.

This module imports nothing from ``schemas.messages``: the instance record and the commands
there refer to the shapes here.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Annotated, Final, Literal

import msgspec
from msgspec import UNSET, UnsetType

from schemas.api import InstanceName, InstanceState, Timestamp

__all__ = [
    "MIN_SCHEDULE_INTERVAL_S",
    "SNAPSHOT_ID_PATTERN",
    "CreateSnapshotRequest",
    "FileIdentity",
    "ForkInstanceRequest",
    "ForkSnapshotRequest",
    "ForkSource",
    "RestoreSnapshotRequest",
    "ScheduleRetention",
    "ScheduleState",
    "Snapshot",
    "SnapshotCompressionConfig",
    "SnapshotDisk",
    "SnapshotFile",
    "SnapshotKind",
    "SnapshotManifest",
    "SnapshotRecord",
    "SnapshotSchedule",
    "SnapshotScheduleRequest",
    "SnapshotSource",
    "StandbyRequest",
    "TargetState",
    "is_valid_snapshot_id",
    "scheduled_name",
]

#: hypeman's floor for a schedule's interval (a worker setting may lower it for tests).
MIN_SCHEDULE_INTERVAL_S: Final = 60.0

#: Snapshot ids are directory names and KV keys: one token of safe characters.
SNAPSHOT_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,62}$"

#: A snapshot name is unique per source instance; hypeman allows 63 characters.
SnapshotName = Annotated[str, msgspec.Meta(min_length=1, max_length=63)]
#: A schedule's generated names are ``<prefix>-<timestamp>``: hypeman caps the prefix at 47.
NamePrefix = Annotated[str, msgspec.Meta(max_length=47)]

TargetState = Literal["Stopped", "Standby", "Running"]


class SnapshotKind(enum.StrEnum):
    STANDBY = "Standby"  # memory + disks: resumes where it was
    STOPPED = "Stopped"  # disks only: boots from them


# -- wire: requests ----------------------------------------------------------------------------


class SnapshotCompressionConfig(msgspec.Struct, kw_only=True):
    enabled: bool
    algorithm: Literal["zstd", "lz4"] | UnsetType = UNSET
    level: int | UnsetType = UNSET


class CreateSnapshotRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    kind: SnapshotKind
    name: SnapshotName | UnsetType = UNSET
    tags: dict[str, str] | UnsetType = UNSET
    #: vmfleet keeps memory uncompressed (forks and wakes read it as it is): only
    #: ``{"enabled": false}`` is accepted (gateway.requests.refuse_compression).
    compression: SnapshotCompressionConfig | UnsetType = UNSET


class StandbyRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /instances/{id}/standby``'s optional body (hypeman's InstanceStandbyParams)."""

    compression: SnapshotCompressionConfig | UnsetType = UNSET
    compression_delay: str | UnsetType = UNSET


class ForkInstanceRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: InstanceName
    #: A Running source is snapshotted while it keeps running (it is paused for the copy).
    from_running: bool = False
    target_state: TargetState | UnsetType = UNSET


class ForkSnapshotRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: InstanceName
    target_state: TargetState | UnsetType = UNSET
    target_hypervisor: str | UnsetType = UNSET


class RestoreSnapshotRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    target_state: TargetState | UnsetType = UNSET
    target_hypervisor: str | UnsetType = UNSET


class ScheduleRetention(msgspec.Struct, kw_only=True):
    #: Keep at most this many scheduled snapshots (0: no count limit).
    max_count: Annotated[int, msgspec.Meta(ge=0)] | UnsetType = UNSET
    #: Delete scheduled snapshots older than this (a Go duration).
    max_age: str | UnsetType = UNSET


class SnapshotScheduleRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    interval: str
    retention: ScheduleRetention
    metadata: dict[str, str] | UnsetType = UNSET
    name_prefix: NamePrefix | UnsetType | None = UNSET


# -- wire: responses ---------------------------------------------------------------------------


class Snapshot(msgspec.Struct, kw_only=True):
    """hypeman's Snapshot. Build it with :meth:`SnapshotRecord.to_api`."""

    id: str
    created_at: Timestamp
    kind: SnapshotKind
    size_bytes: int
    source_hypervisor: str
    source_instance_id: str
    source_instance_name: str
    name: str | None = None
    tags: dict[str, str] | UnsetType = UNSET
    compression_state: Literal["none"] = "none"
    uncompressed_size_bytes: int | UnsetType = UNSET
    #: vmfleet: the hosts holding a complete copy (the first took it).
    hosts: list[str] | UnsetType = UNSET


class SnapshotSchedule(msgspec.Struct, kw_only=True):
    """hypeman's SnapshotSchedule. Build it with :meth:`ScheduleState.to_api`."""

    instance_id: str
    interval: str
    retention: ScheduleRetention
    next_run_at: Timestamp
    created_at: Timestamp
    updated_at: Timestamp
    last_run_at: Timestamp | None = None
    last_snapshot_id: str | None = None
    last_error: str | None = None
    metadata: dict[str, str] | UnsetType = UNSET
    name_prefix: str | None = None


class ForkSource(msgspec.Struct, frozen=True, kw_only=True):
    """A create that is a fork: the new instance resumes this snapshot (kind Standby) or
    boots from its disks (kind Stopped), with its own identity."""

    snapshot_id: str
    #: None: the snapshot's kind decides (Standby -> Running, Stopped -> Stopped).
    target_state: TargetState | None = None


# -- records -----------------------------------------------------------------------------------


class ScheduleState(msgspec.Struct, kw_only=True):
    """An instance's snapshot schedule as its record holds it (the owning worker runs it)."""

    interval_s: float
    max_count: int = 0
    max_age_s: float | None = None
    metadata: dict[str, str] = {}
    name_prefix: str | None = None
    created_at: Timestamp
    updated_at: Timestamp
    next_run_at: Timestamp
    last_run_at: Timestamp | None = None
    last_snapshot_id: str | None = None
    last_error: str | None = None

    def to_api(self, instance_id: str, interval: str, max_age: str | None) -> SnapshotSchedule:
        retention = ScheduleRetention(
            max_count=self.max_count, max_age=max_age if max_age is not None else UNSET
        )
        return SnapshotSchedule(
            instance_id=instance_id,
            interval=interval,
            retention=retention,
            next_run_at=self.next_run_at,
            created_at=self.created_at,
            updated_at=self.updated_at,
            last_run_at=self.last_run_at,
            last_snapshot_id=self.last_snapshot_id,
            last_error=self.last_error,
            metadata=dict(self.metadata) if self.metadata else UNSET,
            name_prefix=self.name_prefix,
        )


class FileIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """A kernel or initrd: the path it was booted from and its content's sha256."""

    path: str
    sha256: str


class SnapshotFile(msgspec.Struct, frozen=True, kw_only=True):
    """One file of a snapshot (``path`` relative to its directory): the unit of transfer."""

    path: str
    size_bytes: int
    allocated_bytes: int
    sha256: str


class SnapshotDisk(msgspec.Struct, frozen=True, kw_only=True):
    """One disk of the saved device model, and the snapshot file holding its data (None: a
    read-only disk the host provides, such as the image's rootfs or the config disk)."""

    id: str
    serial: str
    readonly: bool
    file: str | None = None
    #: ``raw``, or ``qcow2`` when the instance was itself a fork (its layer is the file,
    #: the files below it are in the snapshot too).
    format: str = "raw"
    volume_id: str | None = None


class SnapshotSource(msgspec.Struct, frozen=True, kw_only=True):
    """What a fork needs of the instance the snapshot was taken of to make an instance of
    its own (the source may be gone by then)."""

    id: str
    name: str
    image: str
    image_digest: str
    size_bytes: int
    hotplug_bytes: int = 0
    overlay_bytes: int
    disk_io_bps: int = 0
    vcpus: int
    env: dict[str, str] = {}
    network_enabled: bool = True
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    state: InstanceState
    volume_ids: list[str] = []


class SnapshotManifest(msgspec.Struct, frozen=True, kw_only=True):
    """``manifest.json``: written last, so its presence means the snapshot is complete."""

    id: str
    name: str | None = None
    kind: SnapshotKind
    created_at: Timestamp
    #: The host that took it.
    host: str
    tags: dict[str, str] = {}
    #: Set by a schedule: retention only ever deletes these.
    scheduled: bool = False
    source: SnapshotSource
    hypervisor: str
    vmm_version: str
    kernel: FileIdentity
    initrd: FileIdentity
    memory_bytes: int
    vcpus: int
    disks: tuple[SnapshotDisk, ...] = ()
    files: tuple[SnapshotFile, ...] = ()

    @property
    def size_bytes(self) -> int:
        """What the snapshot holds (apparent sizes, as hypeman counts)."""
        return sum(f.size_bytes for f in self.files)

    @property
    def allocated_bytes(self) -> int:
        """What it takes on disk (sparse files count their written blocks)."""
        return sum(f.allocated_bytes for f in self.files)


class SnapshotRecord(SnapshotManifest, frozen=True, kw_only=True):
    """The KV value of one snapshot (key = id): its manifest and the hosts holding it."""

    hosts: tuple[str, ...] = ()

    @classmethod
    def of(cls, manifest: SnapshotManifest, hosts: tuple[str, ...]) -> SnapshotRecord:
        return cls(**msgspec.structs.asdict(manifest), hosts=hosts)

    def to_api(self) -> Snapshot:
        return Snapshot(
            id=self.id,
            created_at=self.created_at,
            kind=self.kind,
            size_bytes=self.size_bytes,
            source_hypervisor=self.hypervisor,
            source_instance_id=self.source.id,
            source_instance_name=self.source.name,
            name=self.name,
            tags=dict(self.tags) if self.tags else UNSET,
            uncompressed_size_bytes=self.size_bytes,
            hosts=list(self.hosts),
        )

    def has_tags(self, wanted: dict[str, str]) -> bool:
        return all(self.tags.get(key) == value for key, value in wanted.items())


def is_valid_snapshot_id(value: str) -> bool:
    return re.fullmatch(SNAPSHOT_ID_PATTERN, value) is not None


def scheduled_name(prefix: str | None, at: datetime) -> str:
    """A scheduled snapshot's name: ``<prefix>-<UTC time>`` (hypeman's form)."""
    return f"{prefix or 'scheduled'}-{at.strftime('%Y%m%d-%H%M%S')}"
